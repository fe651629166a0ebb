#!/usr/bin/env python
"""Sending the gradient's factors instead of the gradient: is it worth building?

A tied autoencoder's weight gradient is a sum of outer products over the batch,
``dW = h^T g + g_z^T x`` (codes h, reconstruction error g, pre-activation gradient g_z,
input x). Data parallelism all-reduces dW (hidden x inputs). Sufficient-factor
broadcasting (Xie et al., 2016) sends the factors instead: every replica all-gathers the
batch's ``[h, g_z]`` and ``[g, x]`` (batch x 2 hidden and batch x 2 inputs), computes the
rows of dW it owns over the whole batch (the same products, split by rows instead of by
examples), and broadcasts them. Fewer bytes when the batch is much smaller than the layer,
and no sums on the CPU.

This measures, on R real gloo ranks of this host, one thread each, the same step three
ways, interleaved, the median of ``--steps`` after 2 warm-up steps (the slowest rank):

- ``blocks``: terabrain's exchange (parallel.overlap): dW computed in row blocks, each
  all-reduced asynchronously while the next is computed;
- ``factors``: the factors' all-gather, each owner's rows computed and broadcast block by
  block, asynchronously;
- ``no exchange``: the same products on each rank's own batch, nothing sent: the ceiling.

The two exchanges' weights after one step agree to rounding (printed). Written as plain
torch so that the comparison is of the exchanges alone; SGD with momentum 0.9.

    python bench/factor_exchange.py                 # 4096 x 4096, global batch 256, 2 ranks
    python bench/factor_exchange.py --ranks 4 --batch 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=16, help="row blocks of dW")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.batch % args.ranks or args.hidden % args.blocks or (
            args.blocks % args.ranks):
        parser.error("need --ranks >= 2 dividing --batch and --blocks, and --blocks dividing "
                     "--hidden")
    return args


class Step:
    """One rank's tied sigmoid autoencoder step on its share of a fixed global batch."""

    def __init__(self, args, rank: int, ranks: int):
        generator = torch.Generator().manual_seed(0)
        self.args, self.rank, self.ranks = args, rank, ranks
        self.weight = torch.randn(args.hidden, args.inputs, generator=generator) * 0.01
        inputs = torch.rand(args.batch, args.inputs, generator=generator)
        share = args.batch // ranks
        self.x = inputs[rank * share:(rank + 1) * share].contiguous()
        self.momentum = torch.zeros_like(self.weight)
        self.gradient = torch.empty_like(self.weight)

    def factors(self):
        codes = torch.sigmoid(self.x @ self.weight.t())
        # Scaled by the global batch: the replicas' sum is then the mean, with no division.
        error = (codes @ self.weight - self.x) * (2.0 / self.args.batch)
        grad_z = (error @ self.weight.t()) * codes * (1 - codes)
        return codes, error, grad_z

    def update(self) -> None:
        self.momentum.mul_(0.9).add_(self.gradient)
        self.weight.add_(self.momentum, alpha=-0.01)

    def rows(self, block: int) -> slice:
        size = self.args.hidden // self.args.blocks
        return slice(block * size, (block + 1) * size)

    def no_exchange(self) -> None:
        codes, error, grad_z = self.factors()
        torch.mm(codes.t(), error, out=self.gradient)
        self.gradient.addmm_(grad_z.t(), self.x)
        self.update()

    def blocks(self) -> None:
        codes, error, grad_z = self.factors()
        works = []
        for block in range(self.args.blocks):
            rows = self.rows(block)
            torch.mm(codes[:, rows].t(), error, out=self.gradient[rows])
            self.gradient[rows].addmm_(grad_z[:, rows].t(), self.x)
            works.append(dist.all_reduce(self.gradient[rows], async_op=True))
        for work in works:
            work.wait()
        self.update()

    def factor_broadcast(self) -> None:
        codes, error, grad_z = self.factors()
        hidden, inputs = self.args.hidden, self.args.inputs
        left = torch.cat([codes, grad_z], 1)       # batch x 2 hidden
        right = torch.cat([error, self.x], 1)      # batch x 2 inputs
        lefts = torch.empty(self.args.batch, 2 * hidden)
        rights = torch.empty(self.args.batch, 2 * inputs)
        gathers = [dist.all_gather(list(lefts.chunk(self.ranks)), left, async_op=True),
                   dist.all_gather(list(rights.chunk(self.ranks)), right, async_op=True)]
        for work in gathers:
            work.wait()
        owned = self.args.blocks // self.ranks     # each rank owns a contiguous run of blocks
        works = []
        for index in range(owned):
            for owner in range(self.ranks):        # every rank issues them in one order
                rows = self.rows(owner * owned + index)
                if owner == self.rank:
                    torch.mm(lefts[:, rows].t(), rights[:, :inputs], out=self.gradient[rows])
                    self.gradient[rows].addmm_(
                        lefts[:, hidden + rows.start:hidden + rows.stop].t(), rights[:, inputs:])
                works.append(dist.broadcast(self.gradient[rows], src=owner, async_op=True))
        for work in works:
            work.wait()
        self.update()


def timed(step, steps: int) -> float:
    """The slowest rank's median step."""
    step()
    step()
    dist.barrier()
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    median = torch.tensor(statistics.median(times))
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def rank_main(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    step = Step(args, rank, ranks)
    start = (step.weight.clone(), step.momentum.clone())
    after = []
    for way in (step.blocks, step.factor_broadcast):
        way()
        after.append(step.weight.clone())
        step.weight.copy_(start[0])
        step.momentum.copy_(start[1])
    ways = {"blocks": step.blocks, "factors": step.factor_broadcast,
            "no exchange": step.no_exchange}
    seconds = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            seconds[name].append(timed(way, args.steps))
    if rank == 0:
        share = args.batch // ranks
        print(f"tied autoencoder {args.inputs} x {args.hidden}, global batch {args.batch} "
              f"({share} a rank), {ranks} gloo ranks, 1 thread each, torch {torch.__version__}")
        print(f"weights after one step, blocks against factors: max difference "
              f"{(after[0] - after[1]).abs().max().item():.2e}")
        gradient = args.hidden * args.inputs * 4
        sent = {"blocks": 2 * (ranks - 1) / ranks * gradient,
                "factors": (ranks - 1) * share * 2 * (args.hidden + args.inputs) * 4
                + (ranks - 1) / ranks * gradient,
                "no exchange": 0.0}
        ceiling = statistics.median(seconds["no exchange"])
        print(f"{'exchange':<12}{'step ms':>9}{'range ms':>14}{'sent MiB':>10}{'of ceiling':>12}")
        for name, values in seconds.items():
            median = statistics.median(values)
            print(f"{name:<12}{median * 1e3:>9.0f}{min(values) * 1e3:>7.0f}-{max(values) * 1e3:<6.0f}"
                  f"{sent[name] / 2**20:>10.1f}{ceiling / median:>12.0%}")
        print("sent: bytes each rank sends a step (ring all-reduce 2(R-1)/R x dW; factors: "
              "(R-1) x its factors + its share of dW to each peer, (R-1)/R x dW). "
              f"{args.rounds} interleaved rounds, each the slowest rank's median of "
              f"{args.steps} steps.")
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(args.ranks), __file__, *(argv or sys.argv[1:])]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main())
