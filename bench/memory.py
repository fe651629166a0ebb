"""Peak memory per parameter: terabrain, a plain PyTorch loop and the floor, in one run.

Each configuration runs in a fresh subprocess that reports its peak resident set size
(``VmHWM`` of /proc/self/status). The fixed cost of importing torch (measured in its own
subprocess, stated in the output) is subtracted from every figure; what remains is divided
by the model's parameter count.

- terabrain: the full ``terabrain train`` path (run_experiment): data preparation, the
  steps, a final DCP checkpoint, the ``model.safetensors`` export, ``filters.png`` and the
  TensorBoard filter image; the peak of all of it.
- plain: a hand-written loop of the same model, objective, optimizer, batch and data size
  (no checkpoint, no export); the deep case calls terabrain's locally connected layer, which
  plain PyTorch does not have.
- floor: fp32 weights + gradient + optimizer state (one momentum buffer for SGD with
  momentum): 12 bytes per parameter.

    python bench/memory.py                 # all cases (about 10 minutes on 2 cores)
    python bench/memory.py --cases tied    # the issue's check: tied 196,608 x 1,000 AE

Linux only (/proc). Figures: docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9

# Side of the square colour crops (256: 196,608 inputs), examples held (train + held out),
# and steps. The data set is held by both the terabrain run and the plain loop.
SIDE = 256
TRAIN_EXAMPLES, HOLDOUT_EXAMPLES, BATCH, STEPS = 80, 8, 40, 3


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- the cases --------------------------------------------------------------------------

def _photos(model: dict, objective: dict) -> dict:
    return {
        "name": "memory-bench", "seed": 0, "device": "cpu", "precision": "fp32",
        "data": {"source": "photos", "color": True, "patch_size": SIDE,
                 "num_patches": TRAIN_EXAMPLES, "holdout_patches": HOLDOUT_EXAMPLES,
                 "remove_mean": False, "whitening": "none"},
        "model": model, "objective": objective,
        "optimizer": {"name": "sgd", "lr": 1e-4, "momentum": 0.9},
        "train": {"steps": STEPS, "batch_size": BATCH, "log_every": 1, "checkpoint_every": 0,
                  "keep_checkpoints": 1, "histogram_every": 0, "progress": False},
    }


CASES = {
    "tied": _photos({"kind": "autoencoder", "hidden": 1000, "tied": True},
                    {"kind": "reconstruction"}),
    "untied": _photos({"kind": "autoencoder", "hidden": 500, "tied": False},
                      {"kind": "reconstruction"}),
    "rica": _photos({"kind": "rica", "hidden": 1000},
                    {"kind": "rica", "sparsity_weight": 0.1, "sparsity_epsilon": 0.01}),
    "local": _photos(
        {"kind": "deep", "layers": [{"kind": "local", "maps": 16, "kernel": 16, "stride": 4}]},
        {"kind": "rica", "sparsity_weight": 0.1, "sparsity_epsilon": 0.01}),
}
OPTIMIZER_STATE_COPIES = 1  # SGD with momentum: one buffer per parameter


# --- children ---------------------------------------------------------------------------

def child_import() -> dict:
    """Peak resident memory after ``import torch``, and after building one torch.optim
    optimizer: its methods are wrapped by ``torch._disable_dynamo``, which imports
    torch._dynamo (and sympy) on the first call, ~0.07 GB that any training loop with
    torch.optim holds, the plain loop below as much as terabrain."""
    import torch

    imported = _peak_rss()
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    return {"peak": imported, "runtime_peak": _peak_rss()}


def child_terabrain(case: str) -> dict:
    import torch

    from terabrain.config.loader import validate
    from terabrain.learners.registry import learner_of
    from terabrain.train.run import run_experiment

    config = validate(CASES[case])
    with torch.device("meta"):
        parameters = sum(p.numel() for p in learner_of(config).build(
            config, (SIDE, SIDE, 3), 0).parameters())
    after_imports = _current_rss()
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        results = run_experiment(config, Path(directory) / "run")
        seconds = time.perf_counter() - started
        run = Path(directory) / "run"
        files = {p.name: p.stat().st_size for p in run.iterdir() if p.is_file()}
    losses = results["features"]["final"]
    return {"peak": _peak_rss(), "parameters": parameters, "imports": after_imports,
            "seconds": seconds, "loss": losses.get("loss"), "files": files}


def _plain_tied(x, hidden, tied):
    import torch

    inputs = x.shape[1]
    bound = (6.0 / (inputs + hidden + 1)) ** 0.5
    w1 = torch.nn.Parameter(torch.empty(hidden, inputs).uniform_(-bound, bound))
    b1 = torch.nn.Parameter(torch.zeros(hidden))
    b2 = torch.nn.Parameter(torch.zeros(inputs))
    params = [w1, b1, b2]
    w2 = w1.T
    if not tied:
        w2p = torch.nn.Parameter(torch.empty(inputs, hidden).uniform_(-bound, bound))
        params.append(w2p)
        w2 = w2p

    def loss(batch):
        codes = torch.sigmoid(batch @ w1.T + b1)
        reconstruction = codes @ w2.T + b2
        return (reconstruction - batch).pow(2).sum(dim=1).mean()

    return params, loss


def _plain_rica(x, hidden):
    import torch

    w = torch.nn.Parameter(torch.randn(hidden, x.shape[1]))
    with torch.no_grad():
        w /= w.norm(dim=1, keepdim=True)
    alpha = torch.nn.Parameter(torch.ones(()))
    b = torch.nn.Parameter(torch.zeros(x.shape[1]))

    def loss(batch):
        unit = w / w.norm(dim=1, keepdim=True)
        codes = alpha * (batch @ unit.T)
        reconstruction = codes @ unit + b
        error = (reconstruction - batch).pow(2).sum(dim=1).mean()
        return error + 0.1 * torch.sqrt(codes.pow(2) + 0.01).sum(dim=1).mean()

    return [w, alpha, b], loss


def _plain_local(x, layer):
    import torch

    from terabrain.nn.local import LocallyConnected2d

    module = LocallyConnected2d(3, layer["maps"], (SIDE, SIDE), layer["kernel"], layer["stride"])

    def loss(batch):
        images = batch.view(-1, SIDE, SIDE, 3).permute(0, 3, 1, 2)
        unit = module.weight / module.weight.norm(dim=-1, keepdim=True)
        from terabrain.nn.local import locally_connected, locally_connected_transpose

        codes = locally_connected(images, unit, module.kernel_size, module.stride,
                                  module.output_size, module.block_bytes)
        reconstruction = locally_connected_transpose(codes, unit, module.kernel_size,
                                                     module.stride, module.input_size,
                                                     module.block_bytes)
        error = (reconstruction - images).pow(2).flatten(1).sum(dim=1).mean()
        return error + 0.1 * torch.sqrt(codes.pow(2) + 0.01).flatten(1).sum(dim=1).mean()

    return list(module.parameters()), loss


def child_plain(case: str) -> dict:
    import torch

    torch.manual_seed(0)
    spec = CASES[case]
    model = spec["model"]
    after_imports = _current_rss()
    x = torch.rand(TRAIN_EXAMPLES + HOLDOUT_EXAMPLES, SIDE * SIDE * 3)
    if model["kind"] == "autoencoder":
        params, loss_of = _plain_tied(x, model["hidden"], model["tied"])
    elif model["kind"] == "rica":
        params, loss_of = _plain_rica(x, model["hidden"])
    else:
        params, loss_of = _plain_local(x, model["layers"][0])
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    started = time.perf_counter()
    for step in range(STEPS):
        batch = x[(step * BATCH) % TRAIN_EXAMPLES:][:BATCH]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
    return {"peak": _peak_rss(), "parameters": sum(p.numel() for p in params),
            "imports": after_imports, "seconds": time.perf_counter() - started,
            "loss": float(loss)}


# --- parent -----------------------------------------------------------------------------

def _spawn(*args: str) -> dict:
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, env=environment, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"import": child_import, "terabrain": child_terabrain,
                  "plain": child_plain}[kind](*rest)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from _common import OtherLoad

    load = OtherLoad()
    baseline = _spawn("import")
    fixed, runtime = baseline["peak"], baseline["runtime_peak"]
    print(f"fixed cost of importing torch (subtracted below): {fixed / GB:.3f} GB; with the "
          f"torch._dynamo that torch.optim imports on first use: {runtime / GB:.3f} GB "
          f"(column 'less optim')")
    print(f"data: {TRAIN_EXAMPLES} + {HOLDOUT_EXAMPLES} crops of {SIDE}x{SIDE}x3, batch {BATCH}, "
          f"{STEPS} steps, SGD momentum 0.9, fp32\n")
    header = (f"{'case':8} {'parameters':>12} {'terabrain':>10} {'plain':>8} {'floor':>7} "
              f"{'tb/plain':>9} {'tb/floor':>9} {'less optim':>11}   (bytes/parameter)")
    print(header)
    figures = {"fixed_import_bytes": fixed, "fixed_runtime_bytes": runtime, "cases": {}}
    for case in args.cases:
        ours = _spawn("terabrain", case)
        plain = _spawn("plain", case)
        n = ours["parameters"]
        floor = 4 * (2 + OPTIMIZER_STATE_COPIES)
        ours_bpp = (ours["peak"] - fixed) / n
        plain_bpp = (plain["peak"] - fixed) / plain["parameters"]
        ours_less_runtime = (ours["peak"] - runtime) / n
        print(f"{case:8} {n:>12,} {ours_bpp:>10.2f} {plain_bpp:>8.2f} {floor:>7.2f} "
              f"{ours_bpp / plain_bpp:>9.2f} {ours_bpp / floor:>9.2f} {ours_less_runtime:>11.2f}",
              flush=True)
        figures["cases"][case] = {
            "parameters": n, "terabrain_peak_bytes": ours["peak"],
            "plain_peak_bytes": plain["peak"], "plain_parameters": plain["parameters"],
            "terabrain_bytes_per_parameter": ours_bpp, "plain_bytes_per_parameter": plain_bpp,
            "terabrain_bytes_per_parameter_less_optim_imports": ours_less_runtime,
            "floor_bytes_per_parameter": floor, "terabrain_seconds": ours["seconds"],
            "plain_seconds": plain["seconds"], "terabrain_loss": ours["loss"],
            "terabrain_import_bytes": ours["imports"], "files": ours["files"],
        }
    other = load.cores()
    print(f"\nother processes used {other:.2f} cores meanwhile (a shared machine: peak memory "
          "does not depend on it, times do)" if other is not None else "")
    for case, f in figures["cases"].items():
        print(f"{case}: terabrain imports {f['terabrain_import_bytes'] / GB:.3f} GB resident "
              f"before training; files {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sorted(f['files'].items()))}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
