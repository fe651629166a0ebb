#!/usr/bin/env python
"""What the checkpoint manifest costs: terabrain's save (DCP + a SHA-256 manifest of every
file, written before the atomic rename) and its verification on restore, against a plain
``torch.distributed.checkpoint.save`` of the same state into a fresh directory (the baseline,
measured in the same run, repetitions interleaved).

    python bench/checkpoint_manifest.py                 # 256 MB of float32 state
    python bench/checkpoint_manifest.py --megabytes 64 --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed.checkpoint as dcp

from terabrain.train.checkpoint import CheckpointManager
from terabrain.train.checkpoint_manifest import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    elements = args.megabytes * 10**6 // 4
    state = {"model": {"weight": torch.randn(elements // 2)},
             "optimizer": {"weight/exp_avg": torch.randn(elements - elements // 2)}}
    plain, managed, verifying = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for repeat in range(args.repeats):
            target = root / f"plain_{repeat}"
            began = time.perf_counter()
            dcp.save(state, storage_writer=dcp.FileSystemWriter(target, sync_files=True))
            plain.append(time.perf_counter() - began)
            shutil.rmtree(target)

            manager = CheckpointManager(root / f"managed_{repeat}", keep=1)
            began = time.perf_counter()
            path = manager.save(1, state)
            managed.append(time.perf_counter() - began)
            began = time.perf_counter()
            verify(path)
            verifying.append(time.perf_counter() - began)
            shutil.rmtree(manager.directory)
    base = statistics.median(plain)
    print(f"state: {args.megabytes} MB of float32, {args.repeats} repetitions, medians")
    print(f"plain dcp.save (baseline)        {base:8.3f} s")
    print(f"terabrain save (+ manifest)      {statistics.median(managed):8.3f} s   "
          f"ratio {statistics.median(managed) / base:.2f}")
    print(f"verify on restore (sizes + sha)  {statistics.median(verifying):8.3f} s   "
          f"ratio {statistics.median(verifying) / base:.2f}")


if __name__ == "__main__":
    main()
