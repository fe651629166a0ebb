#!/usr/bin/env python
"""How well `terabrain plan --profile` predicts step time: predicted against measured on this
machine, for small built-ins on 1, 2 and 4 real ranks.

1. ``terabrain calibrate --repeats 3`` runs once, under torchrun with as many ranks as the
   largest case (4; rank 0 measures the device with all cores; all measure the gloo links,
   and the first 2 again alone, as a 2-rank run has them; three rounds, each figure their
   median), and writes the profile. The same profile predicts every run below: nothing is
   tuned per experiment.
2. Every case is a real `terabrain train` (``terabrain launch --nproc R`` for R > 1, which
   gives each rank cores // R threads; 1 rank uses all cores) for ``--steps`` steps; the
   measured step time is the median of the logged ``step_time_s`` (metrics.jsonl, rank 0,
   which waits for the others at every collective) after the first ``--skip`` steps.
3. The prediction is `plan_experiment(config, R, profile=..., gpus_per_node=R)` for the
   case's (data, model) split: compute + exposed communication (+ reading).

Cases: lbann-ae-small (tied autoencoder 3,072 -> 1,024, batch 40) on 1 rank, model 1x2 and
1x4, data 2x1 and 4x1 (gradients reduced during the backward pass, the default), data 2x1
with the flat all-reduce after it (parallel.overlap=false), the 2x2 mesh, data 2x1 with
one-bit compression, and streamed from a
.npy memory map (1 and 2 ranks); yfcc-15b-small (3 layers: 2 locally connected + dense) with
the pipelined schedule on 1 rank and model 1x2. Then: is the recommended split the fastest
measured one among the 2-rank and the 4-rank splits?

The CPU may be shared with other work: each case prints how many cores other processes
used while it ran ("other"); with other load the measured figures are not reliable.

    python bench/plan_accuracy.py                 # everything, ~15 min on 2 idle cores (9 of them calibrating)
    python bench/plan_accuracy.py --repeats 3     # each case 3 times, interleaved: median and range
    python bench/plan_accuracy.py --cases ae-1,ae-model-2 --steps 20
    python bench/plan_accuracy.py --profile profile.yaml   # skip calibration
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
TARGET = 0.15  # |predicted / measured - 1|


@dataclass
class Case:
    name: str
    experiment: str
    data: int
    model: int
    sets: list[str] = field(default_factory=list)
    measured_s: float | None = None
    runs_s: list[float] = field(default_factory=list)  # one median per repeat
    predicted: dict | None = None
    other_cores: float | None = None
    error: str | None = None
    machine: list[float] = field(default_factory=list)  # probe seconds before each run

    def slowdown(self, reference: float | None) -> float | None:
        """How much slower the machine ran the reference mix just before this case's runs
        than just after calibrating (median over the runs)."""
        if not reference or not self.machine:
            return None
        return statistics.median(self.machine) / reference

    @property
    def ranks(self) -> int:
        return self.data * self.model


AE = "lbann-ae-small"
DEEP = "yfcc-15b-small"
# Pipelined, every layer limited to the run's steps (yfcc-15b-small gives layer 1 400).
DEEP_LAYERS = [
    {"kind": "local", "maps": 8, "kernel": 8, "stride": 4, "sparsity_weight": 0.1, "lcn": {"kernel": 5}},
    {"kind": "local", "maps": 16, "kernel": 4, "stride": 1, "sparsity_weight": 0.1, "lcn": {"kernel": 5}},
    {"kind": "dense", "maps": 64, "sparsity_weight": 0.01},
]


def deep_sets(steps: int) -> list[str]:
    layers = [{**layer, "steps": steps} for layer in DEEP_LAYERS]
    return ["model.schedule=pipelined", "model.start_after=2", f"model.layers={json.dumps(layers)}"]


def cases(npy: Path, steps: int) -> list[Case]:
    # The resident run's preprocessing (lbann-ae-small: no mean removal, no whitening).
    streamed = ["data={source: npy, path: %s, stream: true, remove_mean: false, "
                "whitening: none}" % npy]
    return [
        Case("ae-1", AE, 1, 1),
        Case("ae-model-2", AE, 1, 2),
        Case("ae-data-2", AE, 2, 1),
        Case("ae-model-4", AE, 1, 4),
        Case("ae-data-4", AE, 4, 1),
        Case("ae-2x2", AE, 2, 2),
        Case("ae-data-2-flat", AE, 2, 1, ["parallel.overlap=false"]),
        Case("ae-data-2-onebit", AE, 2, 1, ["parallel.compression=onebit"]),
        Case("ae-streamed-1", AE, 1, 1, streamed),
        Case("ae-streamed-data-2", AE, 2, 1, streamed),
        Case("deep-1", DEEP, 1, 1, deep_sets(steps)),
        Case("deep-model-2", DEEP, 1, 2, deep_sets(steps)),
    ]


def clean_environ(threads: int) -> dict[str, str]:
    prefixes = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL", "TORCHELASTIC_")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    environ = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}
    path = environ.get("PYTHONPATH")
    # Passive OpenMP threads: on a shared CPU the default (spinning) threads make a
    # multi-threaded step 3-6x slower (bench/cpu_threads.py); both calibration and runs use it.
    return {**environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def calibrate(out: Path, quick: bool, repeats: int, ranks: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(ranks), "--max-restarts", "0", "-m", "terabrain", "calibrate", "--out", str(out),
               "--name", "this-machine", "--repeats", str(repeats)] + (["--quick"] if quick else [])
    print(f"calibrating (torchrun, {ranks} ranks) ...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env=clean_environ(1), timeout=900 * repeats)
    if result.returncode != 0:
        sys.exit(f"calibrate failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    print("\n".join("  " + line for line in result.stdout.splitlines() if line.startswith("  ")))


def sets_for(case: Case, args) -> list[str]:
    return case.sets + [
        f"parallel.data={case.data}", f"parallel.model={case.model}",
        f"train.steps={args.steps}", f"train.log_every={args.log_every}",
        f"train.checkpoint_every={10 * args.steps}", "train.progress=false",
    ]


def machine_probe() -> float:
    """Seconds of a fixed mix on all cores: a batch-40 product, a strided copy like a locally
    connected layer's patches, an elementwise pass (each the median over ~0.1 s). Probed
    right after calibrating and before every run: this VM's speed moves by 20-45 % over
    minutes, and a miss that follows the machine is the machine's, not the model's."""
    import torch

    from terabrain.capacity.calibrate import timed

    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 3072, generator=generator), torch.randn(3072, 1024, generator=generator)
    image = torch.randn(48, 48, 3 * 192, generator=generator)
    patches = image.unfold(0, 8, 4).unfold(1, 8, 4)
    x, y = torch.rand(2**20, generator=generator), torch.rand(2**20, generator=generator)
    cpu = torch.device("cpu")
    mix = (lambda: a @ b, lambda: patches.contiguous(), lambda: x * y)
    # The best of 5 passes: a process's first pass pays its allocations' page faults (8 ms
    # against 4.9 for the passes after it here).
    return min(sum(timed(fn, cpu, 0.1) for fn in mix) for _ in range(5))


def measure(case: Case, args, scratch: Path) -> None:
    case.machine.append(machine_probe())
    cores = os.cpu_count() or 1
    out = scratch / f"run-{case.name}-{len(case.runs_s)}"
    train = ["train", case.experiment, "--out", str(out)]
    for item in sets_for(case, args):
        train += ["--set", item]
    if case.ranks == 1:
        command = [sys.executable, "-m", "terabrain", *train]
    else:
        command = [sys.executable, "-m", "terabrain", "launch", "--nproc", str(case.ranks), *train]
    print(f"  {case.name}: {case.experiment} mesh {case.data}x{case.model} ...", end="", flush=True)
    load = OtherLoad()
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=args.timeout,
                            env=clean_environ(max(1, cores // case.ranks)))
    case.other_cores = max(load.cores() or 0.0, case.other_cores or 0.0)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["?"]
        case.error = f"exit {result.returncode}: " + lines[-1]
        # The ranks' own output before the launcher's line: a rank killed by a signal says
        # nothing itself, but the runtime that killed it (an abort) usually does just before.
        print(f" FAILED {case.error}\n    " + "\n    ".join(lines[-15:]), flush=True)
        return
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    times = [r["step_time_s"] for r in records
             if r.get("stage") == "features" and r.get("step", 0) > args.skip]
    if not times:
        case.error = "no logged steps after the warm-up"
        print(f" FAILED {case.error}")
        return
    case.runs_s.append(statistics.median(times))
    case.measured_s = statistics.median(case.runs_s)
    print(f" {case.runs_s[-1] * 1e3:.1f} ms/step ({time.perf_counter() - began:.0f} s, other "
          f"processes {case.other_cores if case.other_cores is not None else float('nan'):.2f} cores)",
          flush=True)


def predict(case: Case, args, profile) -> None:
    from terabrain.capacity.planner import plan_experiment
    from terabrain.config.loader import load_experiment

    config = load_experiment(case.experiment, sets_for(case, args))
    plan = plan_experiment(config, case.ranks, profile.device_memory, profile=profile,
                           gpus_per_node=case.ranks)
    split = next(s for s in plan.splits if (s.data, s.model) == (case.data, case.model))
    case.predicted = {"step_s": split.step_time_s, "compute_s": split.compute_s,
                      "exposed_s": split.exposed_s, "read_s": split.read_s}


def recommended(experiment: str, ranks: int, args, profile, sets: list[str]) -> tuple[int, int]:
    from terabrain.capacity.planner import plan_experiment
    from terabrain.config.loader import load_experiment

    config = load_experiment(experiment, sets)
    plan = plan_experiment(config, ranks, profile.device_memory, profile=profile, gpus_per_node=ranks)
    return (plan.recommended.data, plan.recommended.model)


def cause(case: Case, reference: float | None = None) -> str:
    """Why a point misses, from what the run and the model say (the causes were found by
    profiling real steps with torch.profiler; docs/scaling.md has the figures)."""
    p = case.predicted
    reasons = []
    slowdown = case.slowdown(reference)
    if slowdown is not None and abs(slowdown - 1) > 0.1 and (slowdown > 1) == (
            p["step_s"] < case.measured_s):
        reasons.append(f"the machine itself ran a fixed reference mix {slowdown:.2f}x as long "
                       "just before these runs as just after calibrating, in the direction "
                       "of the miss")
    if len(case.runs_s) > 1 and min(case.runs_s) <= p["step_s"] <= max(case.runs_s):
        reasons.append("the prediction lies inside the range of the repeated runs: this "
                       "machine's own spread")
    if case.other_cores is not None and case.other_cores > 0.2:
        reasons.append(f"other processes used {case.other_cores:.1f} of the cores during the run "
                       "(and others may have run during calibration)")
    if any("compression" in item for item in case.sets):
        reasons.append("compressed exchange: calibrate times one compress + decompress of a "
                       "1024 x 1024 contiguous gradient; the exchange compresses column ranges "
                       "of the gradient's transposed view and its copies are counted as "
                       "streams at the elementwise and fresh-buffer rates "
                       "(terabrain/capacity/work.py: PACKED_EXCHANGE_*), not timed as such")
    if case.ranks == 1 and case.experiment == AE:
        reasons.append("one rank on all cores: calibrate's rates for batch-40 GEMMs with 2 "
                       "threads moved by up to 45% between calibrations on this machine (the "
                       "same point 57 and 103 GFLOP/s), more than for one thread per rank")
    if case.experiment == DEEP:
        reasons.append("deep network: calibrate measures each locally connected layer trained "
                       "and encoding alone (local_points nn / encode), a layer's activation "
                       "work (losses, LCN: activation_bandwidth) and its fixed cost "
                       "(deep_layer_overhead_s); the step is mostly patch copies and small "
                       "kernels, the memory-bound work whose speed moves most on this VM (the "
                       "8-map layer trained at 15-26 GFLOP/s between calibrations; with its "
                       "buffers kept, the same case 44-80 ms between runs)")
    if case.experiment == DEEP and case.model > 1:
        reasons.append("split deep layers: each of the 19 collectives a step waits for is charged what "
                       "a call costs inside a step (Link.sync_s, the mean between phases of "
                       "compute); the waits for the slower rank at each of them vary with "
                       "this machine's scheduling (the same case 67-106 ms between runs)")
    if case.ranks > (os.cpu_count() or 1) and case.experiment != DEEP:
        reasons.append("more ranks than cores: calibrate's 4-rank rates are the mean over a "
                       "window; a step waits for the slowest rank at every collective")
    if p["exposed_s"] > 0.3 * p["step_s"] and case.experiment != DEEP:
        reasons.append("communication-heavy: calibrate timed gloo with the ranks idle; in "
                       "training the collectives compete with the other rank's compute")
    return "; ".join(reasons) or "unexplained"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--skip", type=int, default=10, help="steps left out as warm-up")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--profile", type=Path, help="a profile to use instead of calibrating")
    parser.add_argument("--save-profile", type=Path, help="keep the calibrated profile here")
    parser.add_argument("--quick-calibration", action="store_true")
    parser.add_argument("--calibrate-repeats", type=int, default=3, metavar="N",
                        help="terabrain calibrate --repeats N: every figure the median of N "
                        "rounds (this VM's speed moves for minutes; default 3)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every case, interleaved; the table shows their median and "
                        "range (this machine's run-to-run spread is itself 10-30%%)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.steps <= args.skip:
        parser.error("--steps must exceed --skip")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.calibrate_repeats < 1:
        parser.error("--calibrate-repeats must be at least 1")

    import torch

    from terabrain.capacity.profile import load_profile

    print(f"plan accuracy on {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.steps} steps per run, median of logged step times after step {args.skip}")
    with tempfile.TemporaryDirectory(prefix="terabrain-plan-accuracy-") as tmp:
        scratch = Path(tmp)
        npy = scratch / "patches.npy"
        np.save(npy, np.random.default_rng(0).random((4000, 3072), dtype=np.float32))
        all_cases = cases(npy, args.steps)
        if args.cases:
            wanted = set(args.cases.split(","))
            unknown = wanted - {c.name for c in all_cases}
            if unknown:
                parser.error(f"--cases: unknown {sorted(unknown)}; allowed: "
                             f"{', '.join(c.name for c in all_cases)}")
            all_cases = [c for c in all_cases if c.name in wanted]
        profile_path = args.profile or args.save_profile or scratch / "profile.yaml"
        if args.profile is None:
            # As many ranks as the largest case: the links of every smaller one are measured
            # too (a time-shared node's links depend on how many ranks share it).
            calibrate(profile_path, args.quick_calibration, args.calibrate_repeats,
                      max(2, max(c.ranks for c in all_cases)))
        profile = load_profile(str(profile_path))
        machine_probe()  # this process's first probe pays its allocations
        reference = machine_probe()  # the machine's speed as the profile saw it
        for repeat in range(args.repeats):
            if args.repeats > 1:
                print(f"round {repeat + 1} of {args.repeats}", flush=True)
            for case in all_cases:
                if case.error is None:
                    measure(case, args, scratch)
        for case in all_cases:
            if case.error is not None:
                case.measured_s = None  # a failed repeat: no figure rather than a partial one
            if case.measured_s is not None:
                predict(case, args, profile)
        checks = []
        for ranks in (2, 4):
            runs = [c for c in all_cases if c.experiment == AE and c.ranks == ranks
                    and not c.sets and c.measured_s is not None]
            if len(runs) >= 2:
                fastest = min(runs, key=lambda c: c.measured_s)
                advice = recommended(AE, ranks, args, profile, sets_for(runs[0], args)[2:])
                checks.append((ranks, advice, (fastest.data, fastest.model)))

    print()
    print(f"{'case':<20}{'mesh':>6}{'predicted ms':>14}{'compute':>9}{'exposed':>9}{'read':>7}"
          f"{'measured ms':>13}{'range ms':>13}{'pred/meas':>10}{'ok':>4}{'other':>7}"
          f"{'machine':>9}")
    misses = []
    for case in all_cases:
        mesh = f"{case.data}x{case.model}"
        if case.measured_s is None:
            print(f"{case.name:<20}{mesh:>6}  {case.error}")
            continue
        p = case.predicted
        ratio = p["step_s"] / case.measured_s
        ok = abs(ratio - 1) <= TARGET
        if not ok:
            misses.append(case)
        other = "-" if case.other_cores is None else f"{case.other_cores:.2f}"
        slowdown = case.slowdown(reference)
        machine = "-" if slowdown is None else f"{slowdown:.2f}"
        spread = f"{min(case.runs_s) * 1e3:.1f}-{max(case.runs_s) * 1e3:.1f}"
        print(f"{case.name:<20}{mesh:>6}{p['step_s'] * 1e3:>14.1f}{p['compute_s'] * 1e3:>9.1f}"
              f"{p['exposed_s'] * 1e3:>9.1f}{p['read_s'] * 1e3:>7.1f}{case.measured_s * 1e3:>13.1f}"
              f"{spread:>13}{ratio:>10.2f}{'yes' if ok else 'no':>4}{other:>7}{machine:>9}")
    within = sum(1 for c in all_cases if c.measured_s is not None) - len(misses)
    print(f"\nwithin {TARGET:.0%}: {within} of {sum(1 for c in all_cases if c.measured_s is not None)}")
    for case in misses:
        print(f"  miss {case.name}: predicted/measured {case.predicted['step_s'] / case.measured_s:.2f}"
              f" - {cause(case, reference)}")
    for ranks, advice, fastest in checks:
        verdict = "yes" if advice == fastest else "no"
        print(f"{ranks} ranks: recommended {advice[0]}x{advice[1]}, measured fastest "
              f"{fastest[0]}x{fastest[1]}: {verdict}")
    print("other: cores used by other processes during the run; with other load the measured "
          "times (and the calibration) are not reliable. machine: how long a fixed reference "
          "mix took just before the case's runs over just after calibrating (with --profile: "
          "at the start of this run; 1.20: the "
          "machine was 20% slower than the profile saw it).")
    if args.json:
        print(json.dumps({"cases": [case.__dict__ for case in all_cases],
                          "reference_probe_s": reference, "recommendation_checks": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
