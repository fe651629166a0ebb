"""One rank of bench/deep_model_parallel.py: times layer-wise training steps of a deep
network, split on a model axis of every rank (1 rank: the whole network, unsplit).

Prints one JSON line from rank 0: the median and range of the step times."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from terabrain.config.loader import load_experiment
from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.learners.layerwise import (
    LayerSchedule, LayerwiseModel, LayerwiseObjective, SpatialLayerwiseObjective,
)
from terabrain.nn.deep import DeepNetwork, input_shape_from
from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism
from terabrain.parallel.spatial_network import partition_network
from terabrain.train.stage import build_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="yfcc-15b-small")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    env = detect_launch_env()
    with fail_fast(env):
        split = env.world_size > 1
        if split:
            init_distributed(env, "gloo", 600)
        parallel = Parallelism(build_mesh(1, env.world_size, env) if split else None)
        config = load_experiment(args.experiment, [f"data.patch_size={args.patch}"])
        shape = input_shape_from((args.patch, args.patch, 3))
        layers = config.model.layers
        if split:
            with torch.device("meta"):
                network = DeepNetwork(layers, shape, seed=0)
            network = partition_network(network, parallel.model_mesh)
        else:
            network = DeepNetwork(layers, shape, seed=0)
        model = LayerwiseModel(network)
        schedule = LayerSchedule(model, [10**6] * len(layers), "pipelined", 1, 10**6)
        schedule.started_at = [0] * len(layers)  # every layer trains at every step
        objective = (SpatialLayerwiseObjective if split else LayerwiseObjective)(
            schedule, [layer.sparsity_weight or 0.1 for layer in layers], 0.01)
        inputs = torch.randn(2 * args.batch, args.patch * args.patch * 3,
                             generator=torch.Generator().manual_seed(0))
        trainer = build_trainer(
            model, objective, optimizer=OptimizerConfig(name="adam", lr=1e-3),
            parameters=network.parameters(), train=TrainConfig(steps=10**6, batch_size=args.batch),
            seed=0, inputs=inputs, parallel=parallel)
        times = []
        for step in range(args.warmup + args.steps):
            x, y = trainer.batch(step)
            if split:
                torch.distributed.barrier()
            begin = time.perf_counter()
            trainer.train_step(x, y)
            if split:
                torch.distributed.barrier()
            if step >= args.warmup:
                times.append(time.perf_counter() - begin)
        if env.rank == 0:
            print(json.dumps({"ranks": env.world_size, "median_s": statistics.median(times),
                              "min_s": min(times), "max_s": max(times),
                              "local_parameters": sum(p.numel() for p in network.parameters()),
                              "threads": torch.get_num_threads()}), flush=True)
        if split:
            shutdown_distributed()


if __name__ == "__main__":
    main()
