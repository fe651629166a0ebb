"""Does `terabrain plan` tell the truth about memory? Its predicted peak per rank beside the
peak resident memory each rank of a real run measured (VmHWM, recorded by the run in
results.json), for 1 and more model-parallel ranks on this machine.

    python bench/plan_memory.py lbann-ae-5k --ranks 1 2 --set train.steps=3
    python bench/plan_memory.py natural-patches-rica --ranks 1 2 --set train.steps=2   # minutes

The measured figure is everything the process held, the interpreter and its libraries
included (about 0.5 GB here, which the plan does not count): the comparison means something
for models of several GB, such as lbann-ae-5k. A miss beyond 10% is flagged. The ranks run
one run at a time (`terabrain launch --nproc N`, real processes over gloo); the machine needs
the sum of the ranks' peaks. Figures: docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10
GB = 1e9


def planned_peak(experiment: str, ranks: int, sets: list[str]) -> int:
    """The plan's peak bytes per rank for parallel.data=1, parallel.model=ranks."""
    command = [sys.executable, "-m", "terabrain", "plan", experiment, "--gpus", str(ranks),
               "--gpu-memory", "1TB", "--json", *_set_arguments(sets)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if result.returncode != 0:
        sys.exit(f"plan failed: {result.stderr.strip()}")
    splits = json.loads(result.stdout)["splits"]
    split = next((s for s in splits if s["data"] == 1 and s["model"] == ranks), None)
    if split is None or not split.get("valid", True):
        sys.exit(f"the plan has no valid split data=1 x model={ranks}")
    return int(split["peak_bytes"])


def measured_peaks(experiment: str, ranks: int, sets: list[str], run_dir: Path) -> tuple[list[int], float]:
    """Each rank's peak resident bytes from a real run, and its wall time."""
    parallel = [f"parallel.model={ranks}", "parallel.data=1"] if ranks > 1 else []
    train = ["train", experiment, "--out", str(run_dir), "--set", "train.progress=false",
             *_set_arguments(sets + parallel)]
    command = ([sys.executable, "-m", "terabrain", "launch", "--nproc", str(ranks), *train]
               if ranks > 1 else [sys.executable, "-m", "terabrain", *train])
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"{ranks}-rank run failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    memory = json.loads((run_dir / "results.json").read_text())["memory"]
    return memory["peak_resident_bytes"], wall


def _set_arguments(sets: list[str]) -> list[str]:
    return [a for assignment in sets for a in ("--set", assignment)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="a built-in name or an EXPERIMENT.yaml")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                        help="model-parallel rank counts to run (default: 1 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the experiment (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    rows = []
    print(f"{'ranks':>5}  {'planned/rank':>12}  {'measured (max rank)':>19}  {'measured/planned':>16}  "
          f"{'wall':>7}")
    for ranks in args.ranks:
        planned = planned_peak(args.experiment, ranks, args.set)
        with tempfile.TemporaryDirectory(prefix="plan-memory-") as scratch:
            peaks, wall = measured_peaks(args.experiment, ranks, args.set, Path(scratch) / "run")
        measured = max(peaks)
        ratio = measured / planned
        flag = "" if abs(ratio - 1) <= TOLERANCE else f"  MISS (beyond {TOLERANCE:.0%})"
        print(f"{ranks:>5}  {planned / GB:>9.2f} GB  {measured / GB:>16.2f} GB  {ratio:>16.3f}  "
              f"{wall:>6.0f}s{flag}", flush=True)
        rows.append({"ranks": ranks, "planned_bytes": planned, "measured_bytes": peaks,
                     "ratio": ratio, "wall_s": wall})
    print("measured: each rank's peak resident set (VmHWM), interpreter and libraries included; "
          "planned: `terabrain plan --json`'s peak_bytes for data=1 x model=ranks")
    if args.json:
        args.json.write_text(json.dumps({"experiment": args.experiment, "sets": args.set,
                                         "rows": rows}, indent=2) + "\n")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
