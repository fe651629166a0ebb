"""One rank of bench/sae.py's sharding figures, under torchrun: a TopK autoencoder trained
for a few steps with its latents across all ranks (the model axis), beside the same model in
one process on every rank; prints one JSON line (rank 0) with both loss curves and the
collectives the sharded steps issued, counted by torch's CommDebugMode with their payloads."""

import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.learners.topk_sae import TopKSAEObjective
from terabrain.nn.topk_sae import TopKSAE
from terabrain.parallel import (
    build_mesh,
    detect_launch_env,
    fail_fast,
    init_distributed,
    shutdown_distributed,
)
from terabrain.parallel.latent_topk import ShardedTopK
from terabrain.parallel.parallelism import Parallelism, full
from terabrain.train.stage import build_trainer


class Payloads(TorchDispatchMode):
    """Counts every collective the step issues (DTensor's functional all-reduces and the
    sharded top-k's all-gather) and the bytes of this rank's contribution to each."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "all_reduce" in name or "allgather" in name or "all_gather" in name:
            tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
            if "allgather_" in name:  # c10d.allgather_(outputs, inputs): the inputs are sent
                tensors = [t for t in tree_leaves(args[1]) if isinstance(t, torch.Tensor)]
            kind = "all_gather" if "gather" in name else "all_reduce"
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.bytes[kind] = self.bytes.get(kind, 0) + sum(
                t.numel() * t.element_size() for t in tensors)
        return func(*args, **(kwargs or {}))


def main(inputs: int, latents: int, k: int, batch: int, steps: int) -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=300)
        parallel = Parallelism(build_mesh(1, env.world_size, env))
        x = torch.randn(batch * steps, inputs, generator=torch.Generator().manual_seed(0))
        objective = TopKSAEObjective(10**9, 1.0 / 32, 0.0)  # no latent dies: AuxK stays off

        def trainer(model, parallel=None):
            trained = [model.encoder, model.encoder_bias, model.decoder, model.pre_bias]
            return build_trainer(model, objective, optimizer=OptimizerConfig(name="adam", lr=1e-3),
                                 parameters=trained, train=TrainConfig(steps=steps, batch_size=batch),
                                 seed=0, inputs=x, parallel=parallel)

        one = trainer(TopKSAE(inputs, latents, k, seed=1))
        with torch.device("meta"):
            unplaced = TopKSAE(inputs, latents, k, seed=1)
        model = parallel.parallelize(unplaced)
        model.selection = ShardedTopK(parallel.model_mesh)
        sharded = trainer(model, parallel)
        single_losses, sharded_losses = [], []
        payloads = Payloads()
        for step in range(steps):
            single_losses.append(one.train_step(*one.batch(step))["loss"].item())
            with payloads:
                parts = sharded.train_step(*sharded.batch(step))
            sharded_losses.append(full(parts["loss"]).item())
        if env.rank == 0:
            print(json.dumps({"ranks": env.world_size, "single": single_losses,
                              "sharded": sharded_losses, "calls": payloads.calls,
                              "payload_bytes": payloads.bytes}), flush=True)
        shutdown_distributed()


if __name__ == "__main__":
    main(*(int(v) for v in sys.argv[1:]))
