"""CPU training steps on a shared machine: how OpenMP's wait policy and the thread count
decide what a step costs when other work wants the same cores.

On CPU, PyTorch's intra-op threads are an OpenMP team. Between parallel regions they spin
(``OMP_WAIT_POLICY`` active, the default), which is fastest on idle cores; when another
process (or the data reader's decoding threads) takes a core, a descheduled team member
makes every region wait for a scheduler time slice. This benchmark times the default
experiment's step (RICA, 128 units on 8x8 patches: the full-batch L-BFGS closure on 20,000
patches, and an SGD-sized batch of 256) in fresh processes, each policy with and without a
given number of competing busy processes, and states each figure as a ratio to the default policy on idle
cores (the baseline, measured in the same run).

    python bench/cpu_threads.py            # ~1 min on 2 cores; one busy process
    python bench/cpu_threads.py --busy 3   # heavier oversubscription
    python bench/cpu_threads.py --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

from _common import OtherLoad

SETTINGS = {  # name -> environment added to the measuring process
    "threads=all, OMP_WAIT_POLICY unset (default)": {},
    "threads=all, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads=1": {"OMP_NUM_THREADS": "1"},
}
BATCHES = (20000, 256)


def measure(batch: int, repeats: int, budget_s: float) -> float:
    """Median seconds of one RICA forward + backward + update at ``batch`` patches."""
    import torch

    from terabrain.objectives import rica_loss

    torch.manual_seed(0)
    x = torch.randn(batch, 64)
    weight = torch.nn.functional.normalize(torch.randn(128, 64), dim=1).requires_grad_()

    def step():
        codes = x @ weight.t()
        loss, _ = rica_loss(codes, codes @ weight, x, 0.1, 0.01)
        loss.backward()
        with torch.no_grad():
            weight.sub_(1e-3 * weight.grad)
            weight.grad = None

    step()
    times = []
    began = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - began < budget_s:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if time.perf_counter() - began > 10 * budget_s:
            break
    return sorted(times)[len(times) // 2]


def spin(stop) -> None:
    while not stop.is_set():
        pass


def run_setting(env: dict, batch: int, repeats: int, budget_s: float) -> float:
    """One fresh process per figure: the wait policy is read when libgomp loads."""
    child = dict(os.environ, **env)
    if "OMP_NUM_THREADS" not in env:
        child.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(batch), "--repeats", str(repeats),
         "--budget-s", str(budget_s)],
        env=child, capture_output=True, text=True, check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=1.0, help="time each figure at least this long")
    parser.add_argument("--busy", type=int, default=1, help="competing busy processes (one spinning core each)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(measure(args.measure, args.repeats, args.budget_s))
        return 0

    load = OtherLoad()
    rows = []
    for busy in (0, args.busy):
        stop = mp.Event()
        spinners = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        for spinner in spinners:
            spinner.start()
        try:
            for batch in BATCHES:
                for name, env in SETTINGS.items():
                    seconds = run_setting(env, batch, args.repeats, args.budget_s)
                    rows.append({"setting": name, "batch": batch, "busy_processes": busy,
                                 "step_ms": seconds * 1000})
        finally:
            stop.set()
            for spinner in spinners:
                spinner.join()
    baseline = {r["batch"]: r["step_ms"] for r in rows
                if not r["busy_processes"] and r["setting"].endswith("(default)")}
    for r in rows:
        r["x_baseline"] = r["step_ms"] / baseline[r["batch"]]
    other = load.cores()
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "rows": rows, "other_load_cores": other}, indent=1))
        return 0
    print(f"RICA step (128 units, 8x8 patches), median ms; {os.cpu_count()} cores; baseline: "
          "default policy, no busy process, same batch")
    print(f"{'setting':48s} {'batch':>6s} {'busy processes':>15s} {'step ms':>9s} {'x baseline':>11s}")
    for r in rows:
        print(f"{r['setting']:48s} {r['batch']:6d} {r['busy_processes']:15d} "
              f"{r['step_ms']:9.2f} {r['x_baseline']:10.2f}x")
    if other is not None:
        print(f"other load on this machine while measuring (besides this benchmark and its busy "
              f"processes): {other:.2f} cores (shared machine: figures vary with it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
