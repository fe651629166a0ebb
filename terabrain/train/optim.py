"""Optimizers from torch.optim by name, and their state as a flat dict of tensors.

The flat form is what goes into a DCP checkpoint: every entry a tensor keyed by the
parameter's name, so nothing needs pickling and the checkpoint is readable by key. Lists
(L-BFGS's curvature history) are stacked into one tensor plus a length; Python numbers
become 0-d tensors. Param groups are not saved: they come from the experiment's config.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import empty as dtensor_empty
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from terabrain.capacity.costs import fused_update
from terabrain.config.sections import OptimizerConfig
from terabrain.parallel.row_state import RowShard
from terabrain.train.bf16_weights import StochasticRoundingOptimizer

# torch.optim's fused kernels update a parameter in one pass over its streams. Its default on
# CPU is a loop of separate kernels: SGD with momentum reads and writes 8 parameter-sized
# streams instead of 5 (23 against 16 ms a step for 16M parameters on one core here), Adam
# also makes a parameter-sized temporary for its denominator (111 against 21 ms, and 4 bytes
# per parameter more at the peak; bench/optimizer_step.py). Fused SGD is bit for bit the
# loop's; fused Adam and AdamW may round the last bit differently. Where they apply is one
# rule shared with the step-time counts (terabrain.capacity.costs.fused_update); one fused
# call also may not mix DTensors with plain tensors.


def fused_kernels_apply(name: str, params: list[torch.Tensor]) -> bool:
    """Whether optimizer ``name`` can update ``params`` with torch.optim's fused kernels."""
    if not params:
        return False
    devices = _get_fused_kernels_supported_devices()
    if any(p.device.type not in devices or not p.is_floating_point() for p in params):
        return False
    sharded = sum(isinstance(p, DTensor) for p in params)
    if 0 < sharded < len(params):
        return False
    return fused_update(name, over_dtensors=sharded > 0)


def build_optimizer(config: OptimizerConfig, params: Iterable[nn.Parameter],
                    precision: str = "fp32", seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``config`` names over ``params`` (those that require a gradient), with
    torch.optim's fused kernels where they apply (:func:`fused_kernels_apply`). With
    precision bf16-weights, SGD, Adam and AdamW keep fp32 state and round each update into
    the bf16 weights stochastically (terabrain.train.bf16_weights), seeded by ``seed``."""
    params = [p for p in params if p.requires_grad]
    common = {"lr": config.lr, "weight_decay": config.weight_decay}
    if precision == "bf16-weights" and config.name in ("sgd", "adam", "adamw"):
        extra = ({"momentum": config.momentum, "nesterov": config.nesterov}
                 if config.name == "sgd" else {"betas": config.betas})
        return StochasticRoundingOptimizer(params, config.name, seed=seed, **common, **extra)
    if fused_kernels_apply(config.name, params):
        common["fused"] = True
    if config.name == "sgd":
        return torch.optim.SGD(
            params, momentum=config.momentum, nesterov=config.nesterov, **common
        )
    if config.name == "adagrad":
        return torch.optim.Adagrad(params, **common)
    if config.name == "rmsprop":
        return torch.optim.RMSprop(params, momentum=config.momentum, **common)
    if config.name == "adam":
        return torch.optim.Adam(params, betas=config.betas, **common)
    if config.name == "adamw":
        return torch.optim.AdamW(params, betas=config.betas, **common)
    if config.weight_decay:
        raise ValueError("optimizer.weight_decay is not supported by lbfgs; use the objective's")
    return torch.optim.LBFGS(
        params,
        lr=config.lr,
        max_iter=config.max_iter,
        history_size=config.history_size,
        line_search_fn=None if config.line_search == "none" else config.line_search,
    )


_LIST_LENGTH = "__length"
_PYTHON_NUMBER = "__number"


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _checkpoint_form(model: nn.Module, name: str, tensor: torch.Tensor):
    """``tensor`` as checkpointed for parameter ``name``. A plan that keeps a different block
    of a parameter on each rank as a plain tensor (terabrain.parallel.spatial_network) says
    how through the enclosing module's ``checkpoint_shard(name, tensor)``; others: as is."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        shard = getattr(model.get_submodule(".".join(parts[:cut])), "checkpoint_shard", None)
        if shard is not None:
            return shard(".".join(parts[cut:]), tensor)
    return tensor


def optimizer_state_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``{"<param>/<entry>": tensor}``."""
    names = _param_names(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    flat: dict[str, torch.Tensor] = {}
    for name, param in zip(names, params):
        for key, value in optimizer.state.get(param, {}).items():
            entry = f"{name}/{key}"
            if isinstance(value, torch.Tensor):
                # The live buffer, not a copy: DCP saves synchronously straight from it, and
                # a clone would be one more model-sized tensor at every checkpoint.
                flat[entry] = _checkpoint_form(model, name, value.detach())
            elif isinstance(value, (list, tuple)):
                # L-BFGS preallocates lists with None; the filled entries form a prefix.
                filled = [torch.as_tensor(v) for v in value if v is not None]
                flat[f"{entry}{_LIST_LENGTH}"] = torch.tensor(len(value))
                if filled:
                    flat[entry] = torch.stack(filled)
            elif isinstance(value, (bool, int, float)):
                dtype = torch.bool if isinstance(value, bool) else (
                    torch.int64 if isinstance(value, int) else torch.float64
                )
                flat[f"{entry}{_PYTHON_NUMBER}"] = torch.tensor(value, dtype=dtype)
            elif value is None:
                continue
            else:
                raise TypeError(f"cannot checkpoint optimizer state {entry} of type {type(value)}")
    return flat


def load_optimizer_state_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]
) -> None:
    """Inverse of ``optimizer_state_tensors``."""
    names = _param_names(model, optimizer)
    params = {name: p for name, p in zip(names, (p for g in optimizer.param_groups for p in g["params"]))}
    state: dict[nn.Parameter, dict] = {}

    def slot(entry: str) -> tuple[dict, str]:
        name, _, key = entry.rpartition("/")
        if name not in params:
            raise KeyError(f"checkpoint has optimizer state for unknown parameter {name!r}")
        return state.setdefault(params[name], {}), key

    flat = {entry: value.to_local() if isinstance(value, RowShard) else value
            for entry, value in flat.items()}
    for entry, value in flat.items():
        if entry.endswith(_LIST_LENGTH):
            entry = entry[: -len(_LIST_LENGTH)]
            target, key = slot(entry)
            filled = [v.clone() for v in flat[entry]] if entry in flat else []
            target[key] = filled + [None] * (int(value) - len(filled))
        elif entry.endswith(_PYTHON_NUMBER):
            target, key = slot(entry[: -len(_PYTHON_NUMBER)])
            target[key] = value.item()
        elif f"{entry}{_LIST_LENGTH}" not in flat:
            target, key = slot(entry)
            target[key] = value
    optimizer.state.clear()
    optimizer.state.update(state)


def optimizer_state_template(
    model: nn.Module, saved: dict[str, tuple[torch.Size, torch.dtype]]
) -> dict[str, torch.Tensor]:
    """Empty tensors to load saved optimizer state into, placed like this run's parameters.

    A checkpoint may come from a different mesh, so placements are decided here, not read
    from it: state shaped like its (sharded) parameter is sharded like it (Adam's moments);
    other floating-point state of a sharded parameter is replicated (L-BFGS's flat history);
    step counters and Python numbers are plain tensors, as torch.optim keeps them.
    """
    params = dict(model.named_parameters())
    template: dict[str, torch.Tensor] = {}
    for entry, (size, dtype) in saved.items():
        name, _, key = entry.rpartition("/")
        param = params.get(name)
        bookkeeping = entry.endswith((_LIST_LENGTH, _PYTHON_NUMBER)) or key == "step"
        if param is None or bookkeeping or not dtype.is_floating_point:
            template[entry] = torch.empty(size, dtype=dtype)
        elif isinstance(param, DTensor):
            mesh = param.device_mesh
            placements = param.placements if size == param.shape else [Replicate()] * mesh.ndim
            template[entry] = dtensor_empty(size, dtype=dtype, device_mesh=mesh, placements=placements)
        else:
            block = _checkpoint_form(model, name, torch.empty(param.shape, dtype=dtype, device=param.device))
            fits = isinstance(block, RowShard) and block.size() == size
            template[entry] = block if fits else torch.empty(size, dtype=dtype, device=param.device)
    return template
