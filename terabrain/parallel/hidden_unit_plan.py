"""Model-parallel plans: which parameters are split across the model axis, and how.

The fully connected feature learners are split by hidden unit, the "distributed array" of
Coates et al. 2013 and the distributed matrices of Van Essen et al. 2015: each rank of a model group holds the rows
of W for its share of the hidden units (and the matching columns of an untied decoder).
Each rank computes its hidden units' codes from the full input; the reconstruction,
a sum over hidden units, is a partial sum on each rank and is all-reduced across the model
axis. Per step and rank that sends O(batch x inputs) for the reconstruction plus O(batch)
scalars for sums over hidden units (the sparsity penalty) — the O(batch x (inputs + hidden))
of Coates et al. 2013 at most, and never the weights.

Why DTensor (rather than hand-written collectives in autograd): the model and objective code
stay exactly the code a single process runs — DTensor propagates the sharding through
`F.linear`, the row normalisation of RICA, elementwise activations and reductions, inserts
the all-reduce where a sharded dimension is summed, and differentiates through it. The
optimizers of torch.optim then update sharded parameters shard by shard (Adam, SGD) or, for
L-BFGS, through DTensor's reductions, so its line search sees the global loss and its
curvature pairs the global inner products.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from terabrain.errors import ConfigError

REPLICATED = Replicate()


def hidden_unit_plan(model: nn.Module) -> dict[str, Placement]:
    """Placement on the model axis of every parameter of ``model``, by name: sharded along
    the dimension that indexes hidden units (the model's ``hidden_unit_dims``), replicated
    otherwise (RICA's alpha, decoder biases)."""
    dims = getattr(model, "hidden_unit_dims", None)
    if dims is None:
        raise ConfigError(
            f"parallel.model > 1: no model-parallel plan for {type(model).__name__}; "
            "allowed: rica and autoencoder models"
        )
    return {
        name: Shard(dims[name]) if name in dims else REPLICATED
        for name, _ in model.named_parameters()
    }


def check_divisible(hidden: int, ranks: int) -> None:
    if hidden % ranks:
        raise ConfigError(
            f"model.hidden ({hidden}) must be divisible by parallel.model ({ranks}): "
            "hidden units are split evenly across the model axis"
        )


def apply_hidden_unit_plan(
    model: nn.Module, mesh: DeviceMesh, device: torch.device = torch.device("cpu")
) -> nn.Module:
    """Replace ``model``'s parameters, in place, by DTensors placed on the 1-D model mesh.

    Parameters on the meta device (a model built with ``torch.device("meta")``) are created
    shard by shard on ``device`` and initialised in place by the model's own
    ``init_parameter_``, so no rank ever holds the full matrix; the values equal a
    single-process model's with the same seed. Real parameters are scattered from rank 0.
    """
    plan = hidden_unit_plan(model)
    rank, ranks = mesh.get_local_rank(), mesh.size()
    for name, parameter in list(model.named_parameters()):
        if isinstance(parameter, DTensor):
            continue  # already placed (the trained feature learner under a new head)
        placement = plan[name]
        if parameter.device.type == "meta":
            shape, first_unit = list(parameter.shape), 0
            if isinstance(placement, Shard):
                shape[placement.dim] //= ranks
                first_unit = rank * shape[placement.dim]
            local = torch.empty(shape, dtype=parameter.dtype, device=device)
            model.init_parameter_(name, local, first_unit)
            placed = DTensor.from_local(local, mesh, [placement], run_check=False)
        else:
            placed = distribute_tensor(parameter.detach(), mesh, [placement])
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_parameter(leaf, nn.Parameter(placed, requires_grad=parameter.requires_grad))
    if not getattr(model, "_outputs_made_whole", False):
        model.register_forward_hook(_partial_outputs_made_whole)
        model._outputs_made_whole = True
    return model


def _partial_outputs_made_whole(module: nn.Module, inputs, outputs):
    """Sum partial outputs (the reconstruction, a head's logits) across the model axis as
    they leave the model. Left partial, DTensor would sum them where the objective first
    needs them, after saving the partial residual for the backward pass, and sum it again
    there: twice the model axis traffic of this one all-reduce."""
    def whole(value):
        if isinstance(value, DTensor) and any(p.is_partial() for p in value.placements):
            return value.redistribute(placements=[REPLICATED] * value.device_mesh.ndim)
        return value

    return tuple(whole(v) for v in outputs) if isinstance(outputs, tuple) else whole(outputs)
