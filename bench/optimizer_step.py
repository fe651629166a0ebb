#!/usr/bin/env python
"""The optimizer update as terabrain builds it (terabrain.train.optim: torch.optim's fused
kernels where they apply) against torch.optim's default on CPU (a loop of separate kernels),
and against the bandwidth ceiling of the streams the update must move.

Each side updates one parameter of ``--size`` fp32 values whose gradient is set once; the
update reads and writes its state every step. Repetitions are interleaved (terabrain, loop,
terabrain, ...) so that a drifting machine hits both alike; the table gives the median over
the repetitions of each side's mean step and its range. The ceiling is the streams the update
has to move (SGD with momentum: parameter, gradient and momentum read, parameter and
momentum written: 5; Adam: 7; Adagrad: 5) at the bandwidth of an in-place sum of two such
vectors (``a.add_(b)``: writes land where they were read, as an update's do), timed in the
same run. Peak bytes: the largest buffer allocated beyond
the parameter, its gradient and its state during one step (torch's CPU allocator
statistics are not kept, so this counts the temporaries' sizes with a dispatch mode).

    python bench/optimizer_step.py                       # 16M parameters, all threads, SGD/Adam/AdamW/Adagrad
    python bench/optimizer_step.py --threads 1 --repeats 7
    python bench/optimizer_step.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from terabrain.config.schema import OptimizerConfig  # noqa: E402
from terabrain.train.optim import build_optimizer  # noqa: E402

CASES = {
    "sgd-momentum": (OptimizerConfig(name="sgd", lr=1e-6, momentum=0.9), 5,
                     lambda p: torch.optim.SGD(p, lr=1e-6, momentum=0.9)),
    "adam": (OptimizerConfig(name="adam", lr=1e-6), 7, lambda p: torch.optim.Adam(p, lr=1e-6)),
    "adamw": (OptimizerConfig(name="adamw", lr=1e-6, weight_decay=0.01), 7,
              lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.01)),
    "adagrad": (OptimizerConfig(name="adagrad", lr=1e-6), 5, lambda p: torch.optim.Adagrad(p, lr=1e-6)),
}


class LargestTemporary(TorchDispatchMode):
    """The largest tensor any operation returns that is not written into an existing one."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inplace = func._schema.name.endswith("_") or any(a.is_out for a in func._schema.arguments)
        if not inplace:
            for tensor in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


def make(side: str, case: str, size: int) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(size, generator=generator))
    parameter.grad = torch.randn(size, generator=generator)
    config, _, loop = CASES[case]
    optimizer = build_optimizer(config, [parameter]) if side == "terabrain" else loop([parameter])
    for _ in range(2):  # state made, pages touched
        optimizer.step()
    return optimizer, parameter


def in_place_bandwidth(size: int, repeats: int) -> float:
    """Bytes/s of an in-place sum of two such vectors (two read, one written where it was
    read, as an update writes its state), the best of ``repeats``."""
    target, source = torch.randn(size), torch.randn(size)
    target.add_(source)
    best = min(mean_step_of(lambda: target.add_(source), 5) for _ in range(repeats))
    return 3 * 4 * size / best


def mean_step_of(fn, steps: int) -> float:
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - began) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16 * 2**20, help="parameter values")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per side")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; allowed: {', '.join(CASES)}")
    load = OtherLoad()
    bandwidth = in_place_bandwidth(args.size, 3)
    print(f"optimizer update of {args.size:,} fp32 values; cpu, {torch.get_num_threads()} thread(s); "
          f"torch {torch.__version__}; in-place bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'optimizer':14} {'side':10} {'step ms':>8} {'range ms':>13} {'GB/s':>6} "
              f"{'of ceiling':>10} {'temp MB':>8} {'loop/this':>9} {'same':>5}")
    print(header)
    print("-" * len(header))
    rows = []
    for case in cases:
        streams = CASES[case][1]
        built = {side: make(side, case, args.size) for side in ("terabrain", "loop")}
        times = {side: [] for side in built}
        for _ in range(args.repeats):
            for side, (optimizer, _) in built.items():
                times[side].append(mean_step_of(optimizer.step, args.steps))
        temporaries = {}
        for side, (optimizer, _) in built.items():
            with LargestTemporary() as mode:
                optimizer.step()
            temporaries[side] = mode.largest
        # Five steps at a learning rate that moves the weights: equal bit for bit or not.
        compared = [make(side, case, 4096) for side in ("terabrain", "loop")]
        for optimizer, _ in compared:
            optimizer.param_groups[0]["lr"] = 1e-2
            for _ in range(5):
                optimizer.step()
        same = torch.equal(compared[0][1], compared[1][1])
        loop_ms = statistics.median(times["loop"]) * 1e3
        for side in built:
            ms = statistics.median(times[side]) * 1e3
            rate = streams * 4 * args.size / (ms / 1e3)
            row = {"optimizer": case, "side": side, "step_ms": ms,
                   "min_ms": min(times[side]) * 1e3, "max_ms": max(times[side]) * 1e3,
                   "bytes_per_s": rate, "of_ceiling": rate / bandwidth,
                   "temporary_bytes": temporaries[side], "loop_over_this": loop_ms / ms,
                   "fused": bool(built[side][0].defaults.get("fused")), "same_update": same}
            rows.append(row)
            print(f"{case:14} {side + (' (fused)' if row['fused'] else ''):10} {ms:8.2f} "
                  f"{row['min_ms']:6.2f}-{row['max_ms']:6.2f} {rate / 1e9:6.1f} {row['of_ceiling']:10.0%} "
                  f"{temporaries[side] / 2**20:8.1f} {row['loop_over_this']:9.2f} {'yes' if same else 'no':>5}")
    other = load.cores()
    print("\nGB/s: the parameter-sized streams an update must move (SGD with momentum 5, Adam and "
          "AdamW 7, Adagrad 5) / step time; ceiling: the in-place bandwidth above (a.add_(b))."
          "\ntemp MB: the largest buffer one step allocates beyond the parameter, gradient and state."
          "\nsame: five steps (lr 0.01) from the same start give bit-identical parameters on both sides."
          f"\nother processes used {other if other is not None else float('nan'):.2f} cores while measuring")
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "size": args.size,
                          "in_place_bandwidth": bandwidth, "rows": rows, "other_cores": other}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
