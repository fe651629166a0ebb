#!/usr/bin/env python
"""Strong and weak scaling of terabrain's model and data parallelism over 1, 2 and 4 ranks.

Every configuration is a real multi-process run: ``python -m torch.distributed.run
--standalone --nproc-per-node R bench/_scaling_rank.py ...``, one process per rank, gloo on
CPU (NCCL with ``--device cuda``). Each rank trains the tied sigmoid autoencoder
``--inputs`` x ``--hidden`` (or RICA, ``--model rica``) with terabrain's ``Trainer`` and
``Parallelism`` (SGD, momentum 0.9) on random data and reports its median step time.

* model-parallel: mesh 1xR, hidden units split across the R ranks (DTensor plan);
* data-parallel: mesh Rx1, each rank takes 1/R of the global batch, one gradient all-reduce;
* alone: the no-communication ceiling of data parallelism, measured in the same run: R
  independent 1-rank processes started together, each stepping its own copy of the model on
  1/R of the batch with ``cores // R`` threads, no collective at all. Data parallelism
  cannot beat it on this host, whatever its exchange does: the ratio of the data row to this
  one is what the exchange costs, and this row against the baseline is what splitting the
  cores costs (smaller per-thread products, two processes sharing caches and memory);
* strong scaling: the problem is fixed (global batch ``--batch``, ``--hidden`` units);
* weak scaling: the work per rank is fixed: model-parallel grows the hidden layer to
  R x ``--hidden``, data-parallel grows the global batch to R x ``--batch``.

The baseline is one rank that uses every core (``torch.set_num_threads(os.cpu_count())``).
On CPU each of R ranks gets ``cores // R`` threads (``OMP_NUM_THREADS``), so every row uses the
same cores and the ideal speed-up is 1.0: the question on one machine is what splitting the
work across processes costs. More ranks than cores oversubscribe (marked ``*``). On CUDA each
rank has its own GPU and the ideal speed-up is R (R is limited to the GPUs present).
Speed-up is work per second against the baseline: images/s for strong scaling, GEMM FLOP/s
for weak scaling (where a step does R times the baseline's work); efficiency = speed-up /
ideal.

Bytes per rank per step are measured on the collectives each rank issues (see
``_scaling_rank.py``: CommDebugMode plus each collective's payload, converted with the ring
algorithm's factors: all-reduce 2(n-1)/n x size, all-gather / reduce-scatter (n-1)/n x full
size). Beside them: the analytical minimum, and what the loopback interface carried (gloo
uses TCP between the ranks of one host; NCCL traffic does not show there).

Analytical minimum per rank and step, mesh d x m, fp32:

* model axis: the reconstruction is a sum over hidden units, so each rank holds a partial
  sum of the (batch/d) x inputs reconstruction: one all-reduce, 2(m-1)/m x (batch/d) x inputs
  x 4 bytes, forward. Backward needs nothing more: the gradient of an all-reduced sum with
  respect to each partial sum is the (replicated) gradient of the sum, which every rank can
  compute from the full reconstruction and input it already has; dW and the hidden biases'
  gradients are local rows; the decoder bias' gradient is the same on every rank. (RICA adds
  two scalars: its sparsity sum for the logged loss, and the gradient of alpha.)
* data axis: one all-reduce of the local gradients, 2(d-1)/d x (hidden x inputs / m +
  hidden / m + inputs) x 4 bytes for the tied autoencoder (the logged loss rides along).

    python bench/scaling.py                          # defaults: 4096 x 4096, batch 256, ~6 min
    python bench/scaling.py --ranks 1,2 --modes model --scaling strong --steps 5
    python bench/scaling.py --profile                # + torch.profiler of 1 and 2-rank runs
    python bench/scaling.py --device cuda --json     # NCCL, one GPU per rank
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

HERE = Path(__file__).resolve().parent
RANK_SCRIPT = HERE / "_scaling_rank.py"
RESULT_PREFIX = "SCALING_RESULT "
TARGET = 0.85  # 2-rank strong scaling against the all-cores 1-rank run
# Rows held to it: model parallelism (the first issue's target) and data parallelism with
# gradients reduced during the backward pass (issue 13's).
TARGETS = {"model": "model-parallel", "data": "data-parallel (overlapped)"}
GEMMS_PER_STEP = 5  # forward x W^T, h W; backward g W^T, h^T g, g_z^T x (bench/step_overhead.py)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden units (strong scaling)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (strong scaling)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run first")
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    parser.add_argument("--modes", default="model,data,flat,alone",
                        help="model, data (gradients reduced during the backward pass, "
                        "parallel.overlap), flat (data parallelism with one all-reduce "
                        "after it, parallel.overlap=false) and alone (R independent "
                        "processes on 1/R of the batch each, no communication: data "
                        "parallelism's ceiling on this host), comma-separated")
    parser.add_argument("--overlap-block-mb", type=float, default=4.0,
                        help="parallel.overlap_block_mb of the data rows")
    parser.add_argument("--scaling", default="strong,weak", help="strong, weak or both")
    parser.add_argument("--model", choices=["ae", "rica"], default="ae",
                        help="tied sigmoid autoencoder (default) or RICA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every configuration this many times, interleaved; the "
                             "table shows the median")
    parser.add_argument("--target-repeats", type=int, default=3,
                        help="at least this many runs of the baseline and of the 2-rank "
                             "model- and data-parallel strong-scaling runs (the targets' rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the baseline and the 2-rank strong-scaling runs")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)
    args.ranks = sorted({int(r) for r in args.ranks.split(",")})
    args.modes = [m for m in args.modes.split(",") if m]
    args.scaling = [s for s in args.scaling.split(",") if s]
    for name, values, allowed in (("--modes", args.modes, {"model", "data", "flat", "alone"}),
                                  ("--scaling", args.scaling, {"strong", "weak"})):
        if not values or set(values) - allowed:
            parser.error(f"{name}: allowed values are {', '.join(sorted(allowed))}")
    if any(r < 1 for r in args.ranks):
        parser.error("--ranks must be positive")
    if min(args.repeats, args.target_repeats, args.steps) < 1:
        parser.error("--repeats, --target-repeats and --steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    return args


# --- runs ----------------------------------------------------------------------------------


@dataclass
class Run:
    scaling: str  # "baseline", "strong" or "weak"
    mode: str  # "-", "model", "data" (overlapped), "flat" (data, one all-reduce after) or
    # "alone" (R independent 1-rank processes on 1/R of the batch: no communication)
    ranks: int
    data: int
    model_ranks: int
    hidden: int
    batch: int
    threads: int
    repeats: int = 1
    oversubscribed: bool = False
    profile: bool = False
    results: list[dict] = field(default_factory=list)  # one per repeat that succeeded
    error: str | None = None
    wall_s: float = 0.0
    other_cores: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def mesh(self) -> str:
        return f"{self.data}x{self.model_ranks}"

    @property
    def label(self) -> str:
        if self.scaling == "baseline":
            return "1 rank, all cores"
        if self.mode == "alone":
            return f"{self.scaling}, {self.ranks} processes alone"
        return f"{self.scaling} {self.mode}-parallel, {self.ranks} ranks"

    @property
    def process_batch(self) -> int:
        """The batch one process of an ``alone`` row steps on (the rest: the global batch)."""
        return self.batch // self.ranks if self.mode == "alone" else self.batch


def plan_runs(args, cores: int) -> list[Run]:
    def threads(ranks: int) -> int:  # the host's cores, shared evenly (also feeds GPUs)
        return max(1, cores // ranks)

    target_repeats = max(args.repeats, args.target_repeats)
    baseline = Run("baseline", "-", 1, 1, 1, args.hidden, args.batch, threads(1),
                   repeats=target_repeats, profile=args.profile)
    runs = [baseline]
    for scaling in args.scaling:
        for mode in args.modes:
            for ranks in args.ranks:
                if ranks == 1:
                    continue  # the baseline is the 1-rank run of every mode and scaling
                weak = scaling == "weak"
                hidden = args.hidden * ranks if weak and mode == "model" else args.hidden
                batch = args.batch * ranks if weak and mode != "model" else args.batch
                data, model = {"model": (1, ranks), "alone": (1, 1)}.get(mode, (ranks, 1))
                target = scaling == "strong" and ranks == 2 and mode in (*TARGETS, "alone")
                run = Run(scaling, mode, ranks, data, model, hidden, batch, threads(ranks),
                          repeats=target_repeats if target else args.repeats,
                          profile=args.profile and scaling == "strong" and ranks == 2)
                run.oversubscribed = args.device == "cpu" and ranks * run.threads > cores
                runs.append(run)
    return runs


def clean_environ(threads: int) -> dict[str, str]:
    """This environment without launcher variables (the bench may itself run under srun or
    torchrun), with the rank's thread count."""
    prefixes = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL", "TORCHELASTIC_")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "GROUP_RANK", "ROLE_RANK"}
    environ = {k: v for k, v in os.environ.items()
               if k not in names and not k.startswith(prefixes)}
    repo = str(HERE.parent)
    path = environ.get("PYTHONPATH")
    return {**environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": repo + (os.pathsep + path if path else "")}


def rank_arguments(run: Run, args) -> list[str]:
    return [
        str(RANK_SCRIPT),
        "--inputs", str(args.inputs), "--hidden", str(run.hidden),
        "--batch", str(run.process_batch), "--mesh", run.mesh, "--model", args.model,
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--count-steps", "1",
        "--threads", str(run.threads), "--device", args.device, "--seed", str(args.seed),
        "--overlap-block-mb", "0" if run.mode == "flat" else str(args.overlap_block_mb),
    ]


def commands(run: Run, args) -> list[list[str]]:
    """One torchrun for a parallel row; R plain processes, started together, for ``alone``."""
    if run.mode == "alone":
        return [[sys.executable, *rank_arguments(run, args)] for _ in range(run.ranks)]
    return [[sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node", str(run.ranks), "--max-restarts", "0",
             *rank_arguments(run, args)]]


def stop(process: subprocess.Popen) -> None:
    # torchrun stops its workers on SIGTERM (they run in sessions of their own).
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def launch(run: Run, args, scratch: Path) -> None:
    profile_path = scratch / f"profile-{run.scaling}-{run.mode}-{run.ranks}.txt"
    command_lines = commands(run, args)
    if run.profile and not run.results:  # the first repeat only, the first process
        command_lines[0] += ["--profile", str(profile_path)]
    print(f"  {run.label}: mesh {run.mesh}, hidden {run.hidden}, batch {run.batch}, "
          f"{run.threads} thread(s)/rank ...", end="", flush=True)
    load = OtherLoad()
    begin = time.perf_counter()
    log = scratch / f"run-{run.scaling}-{run.mode}-{run.ranks}-{len(run.results)}"
    logs = [(Path(f"{log}-{i}.out"), Path(f"{log}-{i}.err")) for i in range(len(command_lines))]
    processes = []
    for command, (out, err) in zip(command_lines, logs):
        with open(out, "w") as out_file, open(err, "w") as err_file:
            processes.append(subprocess.Popen(
                command, stdout=out_file, stderr=err_file, text=True, cwd=HERE.parent,
                env=clean_environ(run.threads), start_new_session=True))
    deadline = begin + args.timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                stop(process)
        run.error = f"timed out after {args.timeout:g} s"
        print(f" {run.error}", flush=True)
        return
    run.wall_s = time.perf_counter() - begin
    other = load.cores()
    if other is not None:
        run.other_cores.append(other)
    results = []
    for process, (out, err) in zip(processes, logs):
        stdout, stderr = out.read_text(), err.read_text()
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if process.returncode != 0 or not lines:
            tail = (stdout + stderr).strip().splitlines()[-15:]
            run.error = f"exit code {process.returncode}"
            print(f" FAILED ({run.error}):\n    " + "\n    ".join(tail), flush=True)
            return
        results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    result = results[0]
    if len(results) > 1:  # alone: the processes side by side, as if ranks of one run
        result = {**result, "ranks": [r["ranks"][0] for r in results],
                  "loopback_tx_per_rank_step": 0.0}
    run.results.append(result)
    if result["ranks"][0].get("profile_split") and profile_path.exists():
        run.extra["profile"] = profile_path.read_text()
        run.extra["profile_split"] = result["ranks"][0]["profile_split"]
    print(f" {_slowest(result) * 1e3:.0f} ms/step ({run.wall_s:.0f} s, other processes "
          f"{other if other is not None else float('nan'):.2f} cores)", flush=True)


# --- numbers -------------------------------------------------------------------------------


def _slowest(result: dict) -> float:
    """A run's step time: the slowest rank's median (the ranks wait for each other)."""
    return max(rank["median_step_s"] for rank in result["ranks"])


def step_s(run: Run) -> float:
    """The median over repeats of the run's step time."""
    return statistics.median(_slowest(result) for result in run.results)


def work_flops(run: Run, inputs: int) -> float:
    return GEMMS_PER_STEP * 2.0 * run.batch * inputs * run.hidden


def measured_bytes(run: Run) -> float:
    return max(rank["sent_per_step"] for rank in run.results[0]["ranks"])


def minimum_bytes(run: Run, inputs: int, model: str) -> float:
    d, m = run.data, run.model_ranks
    total = 0.0
    if m > 1:
        scalars = 2 if model == "rica" else 0
        total += 2 * (m - 1) / m * ((run.batch // d) * inputs + scalars) * 4
    if d > 1:
        if model == "rica":
            local = run.hidden * inputs // m + 1 + inputs  # W rows, alpha, bias
        else:
            local = (run.hidden * inputs + run.hidden) // m + inputs  # W rows, b1, b2
        total += 2 * (d - 1) / d * local * 4
    return total


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def summarize(runs: list[Run], args, cores: int) -> list[dict]:
    baseline = runs[0]
    rows = []
    for run in runs:
        row = {"scaling": run.scaling, "mode": run.mode, "ranks": run.ranks, "mesh": run.mesh,
               "threads_per_rank": run.threads, "oversubscribed": run.oversubscribed,
               "hidden": run.hidden, "batch": run.batch, "error": run.error,
               "other_load_cores": max(run.other_cores, default=None)}
        if run.results and baseline.results:
            seconds = step_s(run)
            rate = work_flops(run, args.inputs) / seconds
            speedup = rate / (work_flops(baseline, args.inputs) / step_s(baseline))
            ideal = run.ranks if args.device == "cuda" else 1
            first = run.results[0]
            lo = statistics.median(r["loopback_tx_per_rank_step"] or 0 for r in run.results)
            row.update({
                "step_s": seconds, "images_per_s": run.batch / seconds,
                "gflop_per_s": rate / 1e9, "speedup": speedup, "ideal_speedup": ideal,
                "efficiency": speedup / ideal,
                "bytes_per_rank_step": measured_bytes(run),
                "minimum_bytes_per_rank_step": minimum_bytes(run, args.inputs, args.model),
                "loopback_bytes_per_rank_step": lo if args.device == "cpu" else None,
                "step_s_repeats": [_slowest(result) for result in run.results],
                "collectives_per_step": first["ranks"][0]["collectives_per_step"],
                "collectives": first["ranks"][0]["by_op"],
                "rank_step_s": [rank["median_step_s"] for rank in first["ranks"]],
                "profile_split": run.extra.get("profile_split"),
            })
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'scaling':<9}{'mode':<6}{'ranks':>5}{'mesh':>6}{'thr':>4}{'hidden':>7}"
              f"{'batch':>6}{'n':>3}{'step ms':>9}{'images/s':>9}{'GFLOP/s':>8}{'speed-up':>9}"
              f"{'eff':>6}{'sent MiB':>10}{'min MiB':>9}{'ratio':>7}{'lo MiB':>8}{'other':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        star = "*" if row["oversubscribed"] else " "
        head = (f"{row['scaling']:<9}{row['mode']:<6}{row['ranks']:>4}{star}{row['mesh']:>6}"
                f"{row['threads_per_rank']:>4}{row['hidden']:>7}{row['batch']:>6}")
        if "step_s" not in row:
            print(f"{head}  {row['error'] or 'no result'}")
            continue
        minimum = row["minimum_bytes_per_rank_step"]
        sent = row["bytes_per_rank_step"]
        ratio = f"{sent / minimum:.2f}" if minimum else ("-" if not sent else "inf")
        other = "-" if row["other_load_cores"] is None else f"{row['other_load_cores']:.2f}"
        print(f"{head}{len(row['step_s_repeats']):>3}{row['step_s'] * 1e3:>9.0f}"
              f"{row['images_per_s']:>9.0f}{row['gflop_per_s']:>8.1f}"
              f"{row['speedup']:>9.2f}{row['efficiency']:>6.0%}"
              f"{mib(sent):>10}{mib(minimum):>9}{ratio:>7}"
              f"{mib(row['loopback_bytes_per_rank_step']):>8}{other:>6}")


def print_ceiling(rows: list[dict]) -> None:
    """Each data-parallel row against the processes-alone row of its scaling and ranks: how
    much of what this host allows without any communication the exchange leaves."""
    for alone in rows:
        if alone["mode"] != "alone" or "step_s" not in alone:
            continue
        print(f"\nno-communication ceiling, {alone['scaling']} scaling, {alone['ranks']} "
              f"processes alone: {alone['speedup']:.1%} of the 1-rank all-cores throughput")
        for row in rows:
            if (row["scaling"], row["ranks"]) == (alone["scaling"], alone["ranks"]) and (
                    row["mode"] in ("data", "flat") and "step_s" in row):
                print(f"  {row['mode']}-parallel: {row['speedup']:.1%} of the 1-rank "
                      f"throughput, {row['speedup'] / alone['speedup']:.1%} of the ceiling "
                      f"(the exchange costs {1e3 * (row['step_s'] - alone['step_s']):.0f} ms "
                      "a step beyond it)")


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        dropped = [r for r in args.ranks if r > gpus]
        if dropped:
            print(f"scaling: {gpus} GPU(s): leaving out {dropped} ranks (NCCL needs one GPU "
                  "per rank)", file=sys.stderr)
        args.ranks = [r for r in args.ranks if r <= gpus]
    where = (f"cpu, {cores} cores" if args.device == "cpu"
             else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    model = ("tied sigmoid autoencoder" if args.model == "ae" else "RICA")
    print(f"{model} {args.inputs} x {args.hidden}, global batch {args.batch}, fp32, SGD "
          f"momentum 0.9; {where}; {'gloo' if args.device == 'cpu' else 'nccl'}; "
          f"torch {torch.__version__}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per run (median; slowest rank), "
          f"then 1 step under the collective counter; {args.repeats} run(s) per row, "
          f"{max(args.repeats, args.target_repeats)} for the targets' rows, interleaved")
    runs = plan_runs(args, cores)
    with tempfile.TemporaryDirectory(prefix="terabrain-scaling-") as scratch:
        rounds = max(run.repeats for run in runs)
        for repeat in range(rounds):
            if rounds > 1:
                print(f"round {repeat + 1} of {rounds}", flush=True)
            for run in runs:
                if run.error is None and repeat < run.repeats:
                    launch(run, args, Path(scratch))
    rows = summarize(runs, args, cores)

    print()
    print_table(rows)
    print()
    ideal = ("R (one GPU per rank)" if args.device == "cuda"
             else "1.0 (every row uses the same cores)")
    print("\n".join([
        "n: runs, interleaved. step ms: median over runs of the slowest rank's median step.",
        "images/s: global batch / step. GFLOP/s: GEMM work per step (5 x 2 x batch x inputs x "
        "hidden) / step.",
        f"speed-up: work per second against the 1-rank all-cores baseline; ideal {ideal}; "
        "eff = speed-up / ideal.",
        "sent MiB: bytes sent per rank per step, measured on the collectives issued, with the "
        "ring algorithm's factors",
        "  (all-reduce 2(n-1)/n x size; all-gather, reduce-scatter (n-1)/n x size).",
        "min MiB: analytical minimum: model axis 2(m-1)/m x batch/d x inputs x 4 (forward "
        "only; backward needs none);",
        "  data axis 2(d-1)/d x local gradient bytes. ratio = sent / min.",
        "lo MiB: bytes the loopback interface carried per rank per step (gloo's TCP, headers "
        "included): a cross-check.",
        "other: cores used by other processes during the run (max over runs).",
    ]))
    if any(row["oversubscribed"] for row in rows):
        print(f"* oversubscribed: more ranks than the {cores} cores; each rank gets 1 thread "
              "and the ranks time-share the cores.")
    if any((row["other_load_cores"] or 0) > 0.1 for row in rows):
        print("warning: other processes used CPU during some runs (column 'other'); their "
              "step times are not reliable.")

    verdicts = {}
    for mode, what in TARGETS.items():
        row = next((r for r in rows if (r["scaling"], r["mode"], r["ranks"]) == ("strong", mode, 2)
                    and "step_s" in r), None)
        line = (f"target: 2-rank {what} strong scaling >= {TARGET:.0%} of the 1-rank all-cores "
                "throughput: ")
        if row is None:
            print(f"\n{line}not measured (not selected, or a run failed)")
            continue
        verdicts[mode] = row["speedup"] >= TARGET * row["ideal_speedup"]
        print(f"\n{line}{row['speedup']:.1%} -> {'PASS' if verdicts[mode] else 'FAIL'}")
    verdict = all(verdicts.values()) if verdicts else None
    print_ceiling(rows)
    for run in runs:
        if "profile" in run.extra:
            print(f"\n--- profile: rank 0 of {run.label} (3 steps after the timed ones) ---")
            print(run.extra["profile"].rstrip())
    profiled = [run for run in runs if "profile_split" in run.extra]
    if profiled:
        print("\nwhere a step's time goes (rank 0, 3 profiled steps, ms/step, self time of ops on "
              "the training thread).\nstep self: Optimizer.step's own time = the closure's "
              "Python and waits outside any op (dist.all_reduce's); rest: wall - all ops")
        names = ["gemm", "collectives", "dtensor dispatch", "step self", "other ops",
                 "unattributed", "wall"]
        print(f"{'':<34}" + "".join(f"{name:>11}" for name in [
            "GEMMs", "collective", "DTensor py", "step self", "other ops", "rest", "wall"]))
        for run in profiled:
            split = run.extra["profile_split"]
            print(f"{run.label:<34}" + "".join(f"{split.get(name, 0) * 1e3:>11.1f}"
                                                for name in names))

    if args.json:
        print(json.dumps({
            "device": args.device, "where": where, "torch": torch.__version__,
            "model": args.model, "inputs": args.inputs, "hidden": args.hidden,
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "cores": cores,
            "target": TARGET, "target_met": verdict, "targets_met": verdicts, "rows": rows,
        }))
    return 0 if all(run.error is None for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
