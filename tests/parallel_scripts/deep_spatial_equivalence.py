"""One rank of a multi-process test, run under torchrun: a whole deep network split on the
model axis (terabrain.parallel.spatial_network) against the same network in one process.

Arguments: model-axis sizes to check in turn (the rest of the world is the data axis). The stack has a
padded local layer, L2 pooling, LCN, an untied local layer, LCN and a dense top layer, so
every split part is exercised; halos of the 4-rank case cross more than one neighbour.

Each rank builds the reference (whole, real) and the split network (meta, then only its
blocks) with the same seed, and checks: the initial weights; the summed loss and every
gradient of a first evaluation; the losses of every step of pipelined layer-wise training
with Adam (data parallel too on a 2 x 2 mesh); the final weights and forward copies; and a
DCP checkpoint round trip that restores the optimizer's state (the next step equals the
reference's next step), also from the previous mesh's checkpoint (resharded). Prints
`rank R: all ok` at the end.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from terabrain.config.schema import LayerConfig, OptimizerConfig, TrainConfig
from terabrain.errors import ConfigError
from terabrain.learners.layerwise import (
    LayerSchedule, LayerwiseModel, LayerwiseObjective, SpatialLayerwiseObjective,
)
from terabrain.nn.deep import DeepNetwork
from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism, full
from terabrain.parallel.spatial_network import partition_network
from terabrain.train.checkpoint import CheckpointManager, restore
from terabrain.train.stage import build_trainer
from terabrain.train.trainer import Callback

SHAPE = (3, 28, 28)
LAYERS = [
    LayerConfig(kind="local", maps=4, kernel=4, stride=2, padding=[1, 0], sparsity_weight=0.1,
                pool={"kind": "l2", "kernel": 3, "stride": 2}, lcn={"kernel": 3}),
    LayerConfig(kind="local", maps=4, kernel=3, stride=1, tied=False, sparsity_weight=0.1,
                lcn={"kernel": 3}),
    LayerConfig(kind="dense", maps=6, sparsity_weight=0.01),
]
STEPS, BATCH, ROWS = 6, 8, 32
TOLERANCE = 2e-5


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_step_end(self, trainer, step, metrics):
        self.values.append(metrics["loss"])


def whole_state(model):
    """Every value of ``model``'s state dict as a whole tensor (a collective)."""
    return {k: full(v.detach()) for k, v in model.state_dict().items()}


def compare(what, got, want):
    assert set(got) == set(want), (what, set(got) ^ set(want))
    worst = 0.0
    for key, value in want.items():
        assert got[key].shape == value.shape, (what, key, got[key].shape, value.shape)
        scale = max(value.abs().max().item(), 1e-6)
        difference = (got[key] - value).abs().max().item() / scale
        assert difference < TOLERANCE, f"{what}: {key} differs by {difference:.2e}"
        worst = max(worst, difference)
    return worst


def build(split_mesh=None):
    if split_mesh is None:
        return DeepNetwork(LAYERS, SHAPE, seed=5)
    with torch.device("meta"):
        network = DeepNetwork(LAYERS, SHAPE, seed=5)
    return partition_network(network, split_mesh)


def trainer_for(network, objective_class, parallel, callbacks, inputs, steps=STEPS):
    model = LayerwiseModel(network)
    schedule = LayerSchedule(model, [2 * STEPS] * len(LAYERS), "pipelined", start_after=1,
                             sync_every=2)
    objective = objective_class(schedule, [layer.sparsity_weight for layer in LAYERS], 0.01)
    trainer = build_trainer(
        model, objective, optimizer=OptimizerConfig(name="adam", lr=0.01),
        parameters=network.parameters(), train=TrainConfig(steps=steps, batch_size=BATCH),
        seed=3, inputs=inputs, callbacks=[schedule, *callbacks], parallel=parallel)
    return trainer, schedule, objective


def main():
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=60)
        directory = Path(tempfile.mkdtemp()) if env.rank == 0 else None
        shared = [str(directory)]
        dist.broadcast_object_list(shared, src=0)
        previous = None
        for index, model_ranks in enumerate(map(int, sys.argv[1:])):
            mesh = build_mesh(env.world_size // model_ranks, model_ranks, env)
            worst, previous = check(env, Parallelism(mesh), Path(shared[0]) / str(index), previous)
            print(f"rank {env.rank}: model {model_ranks} ok (largest relative difference "
                  f"{worst:.1e})", flush=True)
        dist.barrier()
        if directory is not None:
            shutil.rmtree(directory)
        print(f"rank {env.rank}: all ok", flush=True)
        shutdown_distributed()


def check(env, parallel, directory, previous):
    """``previous``: a checkpoint of the same training written on another split, which must
    restore here to the same state (DCP reshards the row blocks)."""
    inputs = torch.randn(ROWS, SHAPE[1] * SHAPE[2] * SHAPE[0], generator=torch.Generator().manual_seed(9))

    reference, split = build(), build(parallel.model_mesh)
    worst = compare("initial weights", whole_state(split), whole_state(reference))

    # One evaluation with every layer active: loss and gradients.
    results = []
    for network, objective_class in ((reference, LayerwiseObjective), (split, SpatialLayerwiseObjective)):
        trainer, schedule, objective = trainer_for(network, objective_class, None, [], inputs)
        schedule.started_at = [0] * len(LAYERS)
        loss, parts = objective(trainer.model, inputs[:BATCH])
        loss.backward()
        grads = {}
        for name, parameter in network.named_parameters():
            layer = network.get_submodule(".".join(name.split(".")[:2]))
            shard = getattr(layer, "checkpoint_shard", None)
            grad = parameter.grad if shard is None else shard(name.split(".", 2)[2], parameter.grad)
            grads[name] = full(grad)
        results.append(({"loss": loss.detach(), **parts}, grads))
        network.zero_grad(set_to_none=True)
    worst = max(worst, compare("first evaluation", results[1][0], results[0][0]))
    worst = max(worst, compare("gradients", results[1][1], results[0][1]))

    # Layer-wise training; the split run also on the data axis when there is one.
    losses = [Losses(), Losses()]
    reference, split = build(), build(parallel.model_mesh)
    runs = [trainer_for(reference, LayerwiseObjective, None, [losses[0]], inputs),
            trainer_for(split, SpatialLayerwiseObjective, parallel, [losses[1]], inputs)]
    for trainer, _, _ in runs:
        trainer.fit()
    worst = max(worst, compare("losses", {"loss": torch.tensor(losses[1].values)},
                               {"loss": torch.tensor(losses[0].values)}))
    worst = max(worst, compare("trained state", whole_state(runs[1][0].model),
                               whole_state(runs[0][0].model)))

    # Checkpoint round trip on this mesh: a fresh split trainer restored from it takes the
    # same next step as the reference (Adam's moments must be every rank's own rows).
    path = CheckpointManager(directory).save(STEPS, runs[1][0].state_dict())
    restored, _, _ = trainer_for(build(parallel.model_mesh), SpatialLayerwiseObjective,
                                 parallel, [], inputs, steps=STEPS + 1)
    restore(path, restored)
    worst = max(worst, compare("restored state", whole_state(restored.model),
                               whole_state(runs[1][0].model)))
    if previous is not None:
        resharded, _, _ = trainer_for(build(parallel.model_mesh), SpatialLayerwiseObjective,
                                      parallel, [], inputs, steps=STEPS + 1)
        restore(previous, resharded)
        worst = max(worst, compare("restored from another split", whole_state(resharded.model),
                                   whole_state(runs[1][0].model)))
    for trainer, _, _ in runs:
        trainer.steps = STEPS + 1
    runs[0][0].fit()
    restored.fit()
    worst = max(worst, compare("step after restore", whole_state(restored.model),
                               whole_state(runs[0][0].model)))
    # A conv layer has no split: refused with the layer and the allowed kinds named.
    with torch.device("meta"):
        conv = DeepNetwork([LayerConfig(kind="conv", maps=2, kernel=3)], SHAPE, seed=5)
    try:
        partition_network(conv, parallel.model_mesh)
        raise AssertionError("a conv layer was split")
    except ConfigError as error:
        assert "model.layers[0]: kind conv is not split" in str(error), error
    return worst, path


if __name__ == "__main__":
    main()
