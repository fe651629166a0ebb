#!/usr/bin/env python
"""Gradient compression on 2 and 4 gloo ranks: bytes each rank sends per step, step time and
the loss reached after a fixed number of steps, for every terabrain scheme beside
uncompressed all-reduce and PyTorch's own DDP communication hooks, measured in one run.

Each rank count is one ``torchrun`` of ``bench/_compression_rank.py``, which trains the same
model (same seed, data, batches; the experiment's optimizer) with each method in turn:

* terabrain ``none`` (fp32 all-reduce, the baseline), ``fp16``, ``bf16``, ``onebit``,
  ``threshold`` (tau: about 1/32 of the first step's gradient entries exceed it; ``@M``
  multiplies that tau by M), ``adaptive`` (1/32 of each column);
* PyTorch DDP with ``allreduce_hook``, ``fp16_compress_hook`` and PowerSGD
  (``powerSGD_hook``, rank R, error feedback, warm start).

Bytes: counted on the wire by wrapping ``dist.all_reduce`` / ``all_to_all_single`` (the
collectives still run), the same way for terabrain and DDP; terabrain's own accounting
(``comm_bytes_per_step`` in metrics.jsonl) must agree exactly or the run stops. Step time:
median over the steps after the third, one thread per rank (OMP_NUM_THREADS=1), so on a
2-core machine the 4-rank rows are oversubscribed and all step times include other jobs'
load (reported). Loss: the experiment's objective on its held-out patches after the last
step.

    python bench/compression.py                                # lbann-ae-small, 150 steps
    python bench/compression.py --ranks 2 --steps 50 --methods none,onebit,ddp-powersgd-4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "COMPRESSION_RESULT "
METHODS = ("none,fp16,bf16,onebit,threshold,threshold@8,adaptive,"
           "ddp-allreduce,ddp-fp16,ddp-powersgd-1,ddp-powersgd-8")


def run_ranks(ranks: int, args) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ranks), "--max-restarts", "0",
               str(HERE / "_compression_rank.py"), "--experiment", args.experiment,
               "--steps", str(args.steps), "--methods", args.methods]
    for assignment in args.set:
        command += ["--set", assignment]
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env=environ)
    if result.returncode != 0:
        sys.exit(f"{ranks} ranks failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return [json.loads(line[len(RESULT_PREFIX):]) for line in result.stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]


def table(rows: list[dict]) -> str:
    lines = ["| ranks | method | bytes/rank/step | vs fp32 all-reduce | step (ms) | vs fp32 | loss | vs fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for ranks in sorted({r["ranks"] for r in rows}):
        group = [r for r in rows if r["ranks"] == ranks]
        base = next(r for r in group if r["method"] == "none")
        for r in group:
            name = r["method"] + (f" (tau {r['tau']:.3g})" if r.get("tau") else "")
            saving = base["bytes_per_step"] / r["bytes_per_step"]
            lines.append(
                f"| {ranks} | {name} | {r['bytes_per_step']:,.0f} | {saving:.1f}x fewer | "
                f"{1000 * r['step_s']:.0f} | {r['step_s'] / base['step_s']:.2f}x | "
                f"{r['loss']:.2f} | {100 * (r['loss'] / base['loss'] - 1):+.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--experiment", default="lbann-ae-small")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--set", action="append", default=[], help="experiment override")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args(argv)
    if "none" not in args.methods.split(","):
        args.methods = "none," + args.methods  # the baseline every ratio refers to
    load = OtherLoad()
    rows = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        rows += run_ranks(ranks, args)
    other = load.cores()
    print(f"{args.experiment}, {args.steps} steps, gloo on CPU, one thread per rank, "
          f"{os.cpu_count()} cores")
    print(table(rows))
    if other is not None:
        print(f"\nOther processes used {other:.2f} cores on average while this ran "
              "(the machine is shared: step times include their load).")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
