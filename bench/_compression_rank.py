"""One rank of bench/compression.py, run under torchrun: trains the same model with every
method in turn (same seed, data and batches) and prints one ``COMPRESSION_RESULT {json}``
line per method on rank 0.

Bytes are counted twice: by terabrain's own accounting (``GradientExchange``) and by a wire
counter wrapped around ``torch.distributed.all_reduce`` and ``all_to_all_single`` (the real
collectives still run; the wrapper adds up what each call puts on the wire: all-reduce
2(n-1)/n x buffer bytes, the bandwidth-optimal figure for ring and halving-doubling
algorithms; all-to-all exactly the bytes addressed to other ranks). The wire counter is what
the table shows, for terabrain and for PyTorch's DDP hooks alike; a mismatch with terabrain's
own count stops the benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from terabrain.config.loader import load_experiment
from terabrain.config.schema import ParallelConfig
from terabrain.data.prepare import prepare_data
from terabrain.learners.registry import build_model
from terabrain.objectives import build_objective
from terabrain.parallel import build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed
from terabrain.parallel.compressors import threshold_for
from terabrain.parallel.exchange import all_reduce_bytes
from terabrain.parallel.parallelism import Parallelism
from terabrain.train.optim import build_optimizer
from terabrain.train.stage import build_trainer

RESULT_PREFIX = "COMPRESSION_RESULT "


class WireCounter:
    def __init__(self):
        self.bytes = 0
        self._all_reduce = dist.all_reduce
        self._all_to_all = dist.all_to_all_single
        dist.all_reduce = self.all_reduce
        dist.all_to_all_single = self.all_to_all_single

    def all_reduce(self, tensor, *args, group=None, **kwargs):
        self.bytes += all_reduce_bytes(tensor.numel(), tensor.element_size(), dist.get_world_size(group))
        return self._all_reduce(tensor, *args, group=group, **kwargs)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, **kwargs):
        n, me = dist.get_world_size(group), dist.get_rank(group)
        splits = input_split_sizes or [input.numel() // n] * n
        self.bytes += sum(size for j, size in enumerate(splits) if j != me) * input.element_size()
        return self._all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    def take(self) -> int:
        taken, self.bytes = self.bytes, 0
        return taken


def ddp_hook(name: str):
    if name == "ddp-allreduce":
        return None, default_hooks.allreduce_hook
    if name == "ddp-fp16":
        return None, default_hooks.fp16_compress_hook
    rank = int(name.rsplit("-", 1)[1])  # ddp-powersgd-R
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                        start_powerSGD_iter=2, use_error_feedback=True,
                                        warm_start=True)
    return state, powerSGD_hook.powerSGD_hook


def run(method: str, config, data, mesh, wire: WireCounter, steps: int, tau: float) -> dict:
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.inputs, seed=config.seed)
    objective = build_objective(config.objective)
    optimizer = build_optimizer(config.optimizer, model.parameters())
    scheme, _, multiple = method.partition("@")  # threshold@8: tau x 8
    tau = tau * float(multiple or 1)
    scheme = scheme if not method.startswith("ddp") else "none"
    tuning = {"threshold": {"threshold_tau": tau},
              "adaptive": {"adaptive_proportion": config.parallel.adaptive_proportion}}
    settings = ParallelConfig(compression=scheme, **tuning.get(scheme, {}))
    parallel = Parallelism(mesh, settings)
    trainer = build_trainer(model, objective, optimizer=optimizer,
                            train=config.train.model_copy(update={"steps": steps}),
                            seed=config.seed, inputs=data.train_x, parallel=parallel)
    ddp = None
    if method.startswith("ddp"):
        ddp = DistributedDataParallel(model)
        state, hook = ddp_hook(method)
        ddp.register_comm_hook(state, hook)
    times, sent, counted = [], [], []
    for step in range(steps):
        x, _ = trainer.batch(step)
        begin = time.perf_counter()
        if ddp is None:
            trainer.train_step(x, None)
            counted.append(parallel.exchange.take_bytes()[0])
        else:
            optimizer.zero_grad(set_to_none=True)
            _, reconstruction = ddp(x)
            loss = (reconstruction - x).pow(2).sum(dim=1).mean()  # the reconstruction objective
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - begin)
        sent.append(wire.take())
    if counted and counted != sent:
        raise RuntimeError(f"{method}: terabrain counted {counted[:3]}... bytes, the wire {sent[:3]}...")
    with torch.no_grad():
        loss, _ = objective(model, data.holdout_x)
    skip = min(3, steps - 1)  # PowerSGD's first steps are uncompressed; allocator warm-up
    return {"method": method, "ranks": dist.get_world_size(), "steps": steps,
            "bytes_per_step": statistics.mean(sent[skip:]), "step_s": statistics.median(times[skip:]),
            "loss": float(loss), "tau": tau if scheme == "threshold" else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="lbann-ae-small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", default="none,fp16,bf16,onebit,threshold,adaptive")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo", 600)
        mesh = build_mesh(-1, 1, env)
        config = load_experiment(args.experiment, args.set)
        data = prepare_data(config.data, config.seed)
        wire = WireCounter()
        # threshold's tau: about 1/32 of the first step's gradient entries exceed it (the
        # mean over ranks, so every rank uses the same tau).
        torch.manual_seed(config.seed)
        probe = build_model(config.model, data.inputs, seed=config.seed)
        rows = torch.randperm(len(data.train_x))[: config.train.batch_size]
        loss, _ = build_objective(config.objective)(probe, data.train_x[rows])
        loss.backward()
        tau = torch.tensor(threshold_for([p.grad for p in probe.parameters()], 1 / 32))
        dist.all_reduce(tau)
        tau = float(tau) / dist.get_world_size()
        wire.take()
        for method in args.methods.split(","):
            result = run(method, config, data, mesh, wire, args.steps, tau)
            if env.rank == 0:
                print(RESULT_PREFIX + json.dumps(result), flush=True)
        shutdown_distributed()


if __name__ == "__main__":
    main()
