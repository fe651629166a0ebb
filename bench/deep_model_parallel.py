#!/usr/bin/env python
"""Step time of layer-wise training of a deep network on 2 model-axis ranks against 1.

Every layer trains at every step (the pipelined worst case), Adam, random data. Every rank
runs ``--threads`` threads (OMP_NUM_THREADS, default 1) on both sides, so R ranks use R
times the cores of the baseline and talk over gloo on this host: the ideal speed-up is R
when R cores are free. (Giving the 1-rank baseline every core instead measures mostly
thread contention on a loaded machine: 2 threads on 2 busy cores ran 20x slower than 1.)
What a cluster gains beyond speed is memory: each rank holds 1/R of the rows' filters.

    python bench/deep_model_parallel.py                     # yfcc-15b-small, 48x48, batch 192
    python bench/deep_model_parallel.py --patch 96 --batch 64   # a larger variant
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


def run(ranks: int, threads: int, extra: list[str]) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environ["OMP_NUM_THREADS"] = str(threads)
    script = str(HERE / "_deep_mp_rank.py")
    command = ([sys.executable, script] if ranks == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(ranks), script])
    result = subprocess.run(command + extra, capture_output=True, text=True, env=environ,
                            timeout=1800)
    if result.returncode:
        sys.exit(f"deep_model_parallel: {ranks} ranks failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="yfcc-15b-small")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank, both sides")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    extra = ["--experiment", args.experiment, "--patch", str(args.patch),
             "--batch", str(args.batch), "--steps", str(args.steps)]
    load = OtherLoad()
    one = run(1, args.threads, extra)
    many = run(args.ranks, args.threads, extra)
    other = load.cores()
    print(f"{args.experiment} at {args.patch}x{args.patch}x3, batch {args.batch}, every layer "
          f"active, Adam; {cores} cores on this machine")
    print(f"{'ranks':>5} {'threads/rank':>12} {'median step s':>14} {'range s':>15} {'local params':>13}")
    for row, threads in ((one, args.threads), (many, args.threads)):
        print(f"{row['ranks']:>5} {threads:>12} {row['median_s']:>14.3f} "
              f"{row['min_s']:>7.3f}-{row['max_s']:<7.3f} {row['local_parameters']:>13,}")
    print(f"speed-up (1 rank / {args.ranks} ranks step time): "
          f"{one['median_s'] / many['median_s']:.2f} (ideal {args.ranks}.0 with {args.ranks} free cores)")
    if other is not None:
        print(f"other processes used {other:.1f} cores on average while this ran (shared "
              "machine: timings are noisy)")


if __name__ == "__main__":
    main()
