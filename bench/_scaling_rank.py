#!/usr/bin/env python
"""One rank of ``bench/scaling.py``; run under ``torchrun`` (or alone for one rank).

Builds a tied sigmoid autoencoder (or RICA) ``--inputs`` x ``--hidden``, places it on the
``--mesh DxM`` (data x model) mesh with terabrain's ``Parallelism``, and trains it with
terabrain's ``Trainer`` (SGD, momentum 0.9) on random data: ``--warmup`` untimed steps, then
``--steps`` timed steps, then ``--count-steps`` steps under a communication counter (never
timed: the counter sees every op in Python). Rank 0 prints one line
``SCALING_RESULT {json}`` with every rank's step times and the bytes each collective moved.

Bytes sent per rank per step come from the collectives themselves. ``CommCounter`` is
``torch.distributed.tensor.debug.CommDebugMode`` (which in torch 2.13 records only how many
of each collective ran, not their sizes) plus a record of each collective's payload taken
from its arguments: the DTensor collectives (``_c10d_functional.all_reduce`` and friends) and
the c10d ones that ``dist.all_reduce`` dispatches to (``c10d.allreduce_``, the data-parallel
gradient average). A payload of S bytes on a group of n ranks is converted to bytes sent per
rank with the ring algorithm's factors: all-reduce 2(n-1)/n S, all-gather and reduce-scatter
(n-1)/n S (S the full, gathered size), broadcast (n-1)/n S.

Rank 0 also reads the loopback interface's transmit counter (``/proc/net/dev``, ``lo``) over
the timed steps: gloo talks TCP over loopback between ranks of one host, so that is what
really went over the wire (TCP/IP headers and torchrun's store included), a cross-check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.config.sections import ParallelConfig
from terabrain.nn.autoencoder import RICA, Autoencoder
from terabrain.objectives import ReconstructionObjective, RICAObjective
from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism
from terabrain.parallel.hidden_unit_plan import check_divisible
from terabrain.train.malloc import apply_buffer_policy
from terabrain.train.optim import build_optimizer
from terabrain.train.stage import build_trainer
from terabrain.train.trainer import Callback, Trainer

LR, MOMENTUM = 0.01, 0.9
RESULT_PREFIX = "SCALING_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--rows", type=int, default=0, help="data set rows (0: 4 batches)")
    parser.add_argument("--mesh", default="1x1", help="data x model, e.g. 1x2")
    parser.add_argument("--model", choices=["ae", "rica"], default="ae")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--count-steps", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap-block-mb", type=float, default=4.0,
                        help="parallel.overlap_block_mb; 0: parallel.overlap=false (one flat "
                        "all-reduce after the backward pass)")
    parser.add_argument("--release-freed-buffers", choices=["auto", "always", "never"],
                        default="auto", help="train.release_freed_buffers (terabrain/train/malloc.py)")
    parser.add_argument("--profile", default="", help="write a torch.profiler table here")
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.count_steps < 1 or args.steps < 1:
        parser.error("--steps and --count-steps must be at least 1")
    args.rows = args.rows or 4 * args.batch
    return args


# --- measuring -----------------------------------------------------------------------------

_c10d = torch.ops.c10d
_funcol = torch.ops._c10d_functional
_funcol_autograd = torch.ops._c10d_functional_autograd
_RING = {  # collective -> (kind, how the payload is found)
    _funcol.all_reduce: "all_reduce", _funcol.all_reduce_: "all_reduce",
    _funcol.all_reduce_coalesced: "all_reduce", _funcol.all_reduce_coalesced_: "all_reduce",
    _funcol.all_gather_into_tensor: "all_gather",
    _funcol.all_gather_into_tensor_coalesced: "all_gather",
    _funcol.reduce_scatter_tensor: "reduce_scatter",
    _funcol.reduce_scatter_tensor_coalesced: "reduce_scatter",
    _funcol.broadcast: "broadcast", _funcol.broadcast_: "broadcast",
    _funcol.all_to_all_single: "all_to_all", _funcol_autograd.all_to_all_single: "all_to_all",
    _c10d.allreduce_: "all_reduce", _c10d.allreduce_coalesced_: "all_reduce",
    _c10d._allgather_base_: "all_gather", _c10d.allgather_: "all_gather",
    _c10d._reduce_scatter_base_: "reduce_scatter", _c10d.reduce_scatter_: "reduce_scatter",
    _c10d.broadcast_: "broadcast", _c10d.alltoall_base_: "all_to_all",
}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _group_size(args) -> int:
    """The group size of a collective, from its arguments: a ProcessGroup object (c10d ops),
    a group name (functional collectives) or an explicit group_size."""
    for arg in args:
        if isinstance(arg, dist.ProcessGroup):
            return arg.size()
        if isinstance(arg, torch.ScriptObject):  # c10d ops get the group boxed
            try:
                return dist.ProcessGroup.unbox(arg).size()
            except Exception:  # noqa: BLE001 - another script object (the options)
                pass
    for arg in args:
        if isinstance(arg, str):
            try:
                return dist.distributed_c10d._resolve_process_group(arg).size()
            except Exception:  # noqa: BLE001 - not a group name
                pass
    raise RuntimeError(f"cannot find the group of a collective with arguments {args!r}")


class CommCounter(CommDebugMode):
    """CommDebugMode that also records each collective's payload and group size."""

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = None if any(t is DTensor for t in types) else _RING.get(
            getattr(func, "_overloadpacket", None))
        if kind is not None:
            n = _group_size(args)
            first = _tensors(args[0])
            payload = sum(t.numel() * t.element_size() for t in first)
            if kind == "all_gather" and func._overloadpacket in (
                    _funcol.all_gather_into_tensor, _funcol.all_gather_into_tensor_coalesced,
                    _c10d._allgather_base_):
                # input is this rank's part; the gathered size is n parts (c10d's
                # _allgather_base_ takes (output, input): the output is args[0]).
                if func._overloadpacket is not _c10d._allgather_base_:
                    payload *= n
            factor = {"all_reduce": 2 * (n - 1) / n}.get(kind, (n - 1) / n)
            shapes = [tuple(t.shape) for t in first]
            self.records.append({"op": str(func._overloadpacket).removeprefix("torch.ops."),
                                 "kind": kind, "group": n, "shape": shapes,
                                 "payload": payload, "sent": factor * payload,
                                 "backward": bool(self.advanced_module_tracker.is_bw)})
        return super().__torch_dispatch__(func, types, args, kwargs)


def loopback_tx_bytes() -> int | None:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])
    except (OSError, ValueError, IndexError):
        pass
    return None


class StepClock(Callback):
    """The wall time of every step (the trainer reads the loss each step: a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.durations: list[float] = []
        self.loss = float("nan")

    def on_train_start(self, trainer) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last = time.perf_counter()

    def on_step_end(self, trainer, step, metrics) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now
        self.loss = metrics["loss"]


# Where a profiled step's time goes, by the ops' self time on the training thread.
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"}
PYTHON_OPS = {"PythonSubclass", "Redistribute", "_FromTorchTensor", "_ToTorchTensor"}


def _category(name: str) -> str:
    if name in GEMM_OPS:
        return "gemm"
    if name.startswith(("c10d::", "_c10d_functional", "c10d_functional", "gloo:", "nccl:")):
        return "collectives"
    if name in PYTHON_OPS:
        return "dtensor dispatch"
    if name.startswith("Optimizer.step"):
        # the closure's Python, and blocking waits that are no op of their own: the
        # data-parallel dist.all_reduce waits for gloo here
        return "step self"
    return "other ops"


def profile_steps(trainer: Trainer, steps: int, device: torch.device):
    """A torch.profiler table of ``steps`` more steps, and their time per step split into
    GEMMs, collectives (launch and wait), DTensor's Python dispatch, the optimizer step's own
    time (the closure's Python and blocking waits outside ops, such as dist.all_reduce's),
    other ops, and what no op accounts for (the trainer's loop, callbacks)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trainer.steps += steps
    begin = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.fit()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - begin
    averages = prof.key_averages()
    split: dict[str, float] = defaultdict(float)
    for event in averages:
        split[_category(event.key)] += event.self_cpu_time_total / 1e6 / steps
    split["unattributed"] = max(wall / steps - sum(split.values()), 0.0)
    split["wall"] = wall / steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return averages.table(sort_by=sort, row_limit=25), dict(split)


# --- the run -------------------------------------------------------------------------------


def build(args, parallel: Parallelism, device: torch.device):
    torch.manual_seed(args.seed)
    check_divisible(args.hidden, parallel.model_ranks)
    if args.batch % parallel.data_ranks:
        raise SystemExit(f"--batch {args.batch} is not divisible by {parallel.data_ranks}")
    # As a run builds it (terabrain/train/run.py): without memory, then each rank creates
    # and initialises only its own shard, on its device.
    with torch.device("meta"):
        if args.model == "rica":
            model = RICA(args.inputs, args.hidden, seed=args.seed)
        else:
            model = Autoencoder(args.inputs, args.hidden, tied=True, activation="sigmoid",
                                seed=args.seed)
    objective = RICAObjective(0.1, 0.01) if args.model == "rica" else ReconstructionObjective()
    model = parallel.parallelize(model, device)
    optimizer = build_optimizer(OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM),
                                model.parameters())
    generator = torch.Generator().manual_seed(args.seed + 1)
    data = torch.rand(args.rows, args.inputs, generator=generator)  # pixel-like, in [0, 1)
    return model, objective, optimizer, data


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = detect_launch_env()
    with fail_fast(env):
        device = (torch.device("cuda", env.local_rank) if args.device == "cuda"
                  else torch.device("cpu"))
        init_distributed(env, backend="nccl" if args.device == "cuda" else "gloo",
                         timeout_s=600)
        data_ranks, model_ranks = (int(n) for n in args.mesh.split("x"))
        overlap = (ParallelConfig(overlap=True, overlap_block_mb=args.overlap_block_mb)
                   if args.overlap_block_mb > 0 else ParallelConfig(overlap=False))
        parallel = Parallelism(build_mesh(data_ranks, model_ranks, env), overlap)
        model, objective, optimizer, data = build(args, parallel, device)
        # Freed buffers kept or released as `terabrain train` would (train.release_freed_buffers).
        apply_buffer_policy(args.release_freed_buffers, model)
        clock = StepClock(device)
        trainer = build_trainer(
            model, objective, optimizer=optimizer,
            train=TrainConfig(steps=args.warmup, batch_size=args.batch, log_every=args.log_every),
            seed=args.seed, inputs=data, device=device, callbacks=[clock], parallel=parallel)
        trainer.fit()  # warm-up: allocator, thread pools, gloo pairs, momentum buffers

        if env.world_size > 1:
            dist.barrier()
        clock.durations.clear()
        tx_before = loopback_tx_bytes()
        trainer.steps += args.steps
        trainer.fit()
        tx_after = loopback_tx_bytes()
        timed = list(clock.durations)

        # One counter per step: CommDebugMode's module tracker registers a forward hook per
        # module on every forward pass and removes them only on exit, so a second forward
        # inside one `with` pops its parent list twice (IndexError in torch 2.13).
        records, comm_counts = [], defaultdict(int)
        for _ in range(args.count_steps):
            counter = CommCounter()
            trainer.steps += 1
            with counter, warnings.catch_warnings():
                # its backward pre-hooks fire on module outputs since no input needs a grad
                warnings.simplefilter("ignore", UserWarning)
                trainer.fit()
            records += counter.records
            for op, calls in counter.get_comm_counts().items():
                comm_counts[str(op)] += calls

        profile_table, profile_split = None, None
        if args.profile:
            profile_table, profile_split = profile_steps(trainer, args.profile_steps, device)

        by_op: dict[str, dict] = defaultdict(lambda: {"calls": 0, "payload": 0, "sent": 0.0})
        for record in records:
            key = f"{record['op']} ({'backward' if record['backward'] else 'forward/step'})"
            by_op[key]["calls"] += 1
            by_op[key]["payload"] += record["payload"]
            by_op[key]["sent"] += record["sent"]
        mine = {
            "rank": env.rank,
            "median_step_s": statistics.median(timed),
            "step_s": timed,
            "sent_per_step": sum(r["sent"] for r in records) / args.count_steps,
            "collectives_per_step": len(records) / args.count_steps,
            "comm_counts": {k: v / args.count_steps for k, v in comm_counts.items()},
            "by_op": {k: {**v, "calls": v["calls"] / args.count_steps,
                          "payload": v["payload"] / args.count_steps,
                          "sent": v["sent"] / args.count_steps} for k, v in by_op.items()},
            "shapes": sorted({str(r["shape"]) for r in records}),
            "last_loss": clock.loss,
            "profile_split": profile_split,
        }
        everyone = [mine]
        if env.world_size > 1:
            everyone = [None] * env.world_size
            dist.all_gather_object(everyone, mine)
        if env.rank == 0:
            result = {
                "mesh": args.mesh, "world": env.world_size, "model": args.model,
                "inputs": args.inputs, "hidden": args.hidden, "batch": args.batch,
                "threads": torch.get_num_threads(), "device": device.type,
                "torch": torch.__version__,
                "loopback_tx_per_rank_step": (
                    (tx_after - tx_before) / env.world_size / args.steps
                    if tx_before is not None and tx_after is not None else None),
                "ranks": everyone,
            }
            print(RESULT_PREFIX + json.dumps(result), flush=True)
            if profile_table is not None:
                Path(args.profile).write_text(profile_table + "\n")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
