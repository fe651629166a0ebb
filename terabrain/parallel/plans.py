"""Model-parallel plans: which parameters are split across the model axis, and how.

The fully connected feature learners are split by hidden unit, the "distributed array" of
seed 003 and the distributed matrices of seed 001: each rank of a model group holds the rows
of W for its share of the hidden units (and the matching columns of an untied decoder).
Each rank computes its hidden units' codes from the full input; the reconstruction,
a sum over hidden units, is a partial sum on each rank and is all-reduced across the model
axis. Per step and rank that sends O(batch x inputs) for the reconstruction plus O(batch)
scalars for sums over hidden units (the sparsity penalty) — the O(batch x (inputs + hidden))
of seed 003 at most, and never the weights.

Why DTensor (rather than hand-written collectives in autograd): the model and objective code
stay exactly the code a single process runs — DTensor propagates the sharding through
`F.linear`, the row normalisation of RICA, elementwise activations and reductions, inserts
the all-reduce where a sharded dimension is summed, and differentiates through it. The
optimizers of torch.optim then update sharded parameters shard by shard (Adam, SGD) or, for
L-BFGS, through DTensor's reductions, so its line search sees the global loss and its
curvature pairs the global inner products.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from terabrain.errors import ConfigError
from terabrain.nn.autoencoder import RICA, Autoencoder, SupervisedHead

HIDDEN_ROWS = Shard(0)  # (hidden, inputs) weights and (hidden,) biases
HIDDEN_COLUMNS = Shard(1)  # (inputs, hidden) decoders and (outputs, hidden) heads
REPLICATED = Replicate()


def hidden_unit_plan(model: nn.Module) -> dict[str, Placement]:
    """Placement on the model axis of every parameter of ``model``, by name."""
    if isinstance(model, RICA):
        return {"weight": HIDDEN_ROWS, "alpha": REPLICATED, "bias": REPLICATED}
    if isinstance(model, Autoencoder):
        plan = {"encoder.weight": HIDDEN_ROWS, "encoder.bias": HIDDEN_ROWS}
        if model.tied:
            plan["decoder_bias"] = REPLICATED
        else:
            plan.update({"decoder.weight": HIDDEN_COLUMNS, "decoder.bias": REPLICATED})
        return plan
    if isinstance(model, SupervisedHead):
        inner = {f"features.{k}": v for k, v in hidden_unit_plan(model.features).items()}
        return {**inner, "head.weight": HIDDEN_COLUMNS, "head.bias": REPLICATED}
    raise ConfigError(
        f"parallel.model > 1: no model-parallel plan for {type(model).__name__}; "
        "allowed: rica and autoencoder models"
    )


def check_divisible(hidden: int, ranks: int) -> None:
    if hidden % ranks:
        raise ConfigError(
            f"model.hidden ({hidden}) must be divisible by parallel.model ({ranks}): "
            "hidden units are split evenly across the model axis"
        )


def apply_hidden_unit_plan(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Replace ``model``'s parameters, in place, by DTensors placed on the 1-D model mesh.

    Every rank builds the same full model from the same seed, so each keeps its own slice;
    ``distribute_tensor`` scatters from rank 0, which also guarantees identical replicas.
    """
    plan = hidden_unit_plan(model)
    for name, parameter in list(model.named_parameters()):
        if isinstance(parameter, DTensor):
            continue  # already placed (the trained feature learner under a new head)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        placed = distribute_tensor(parameter.detach(), mesh, [plan[name]])
        owner.register_parameter(leaf, nn.Parameter(placed, requires_grad=parameter.requires_grad))
    return model
