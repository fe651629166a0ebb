"""Spatial model parallelism for whole deep networks (model.kind deep) on the model axis.

``partition_network(network, model_mesh)`` is the plan: it replaces, in a DeepNetwork built
on the meta device (or a real one), every layer and its post-processing by this rank's part,
and leaves the model code as it is. Every map between layers is split by rows into
``spatial.split_evenly`` blocks, one per rank of the model axis:

- a local layer computes its block of output rows (``row_partition``; its filters are those
  rows' locations, created and initialised where they live, equal to one process's); its
  input block is padded (padding rows belong to the first and last rank), the halo rows its
  fields read come from their owners, and the reconstruction's partial sums on halo rows go
  back to them (``spatial.gather_halo`` / ``scatter_add_halo``); its input-shaped bias is
  split like its input;
- pooling and LCN are terabrain/parallel/row_split.py's: pooling reads a halo of
  ``kernel - stride`` rows (its output rows split evenly); LCN reads ``2 (kernel // 2)`` rows on each side (two nested Gaussian
  windows) and all-reduces its per-image mean spread;
- a dense layer (the top layer only) is split by hidden unit: it all-gathers its input,
  computes its units' codes, and reduces its partial reconstruction to each rank's rows;
- conv layers are not split (refused: their shared filters would need a replicated
  gradient sum; use parallel.data).

The RICA loss of a layer, a sum over every position, is a sum over ranks of each rank's
part: ``sum_of_parts`` all-reduces it (backward: identity, each rank seeds its own part;
terabrain.learners.layerwise.SpatialLayerwiseObjective uses it), replicated ``alpha`` has its gradient summed over the model axis, and row-split
parameters keep their own gradients. Parameters are plain local tensors; checkpoints see
them as ``row_state.RowShard`` (true offsets), so DCP saves every rank's block and reloads
on any split or on one process.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from terabrain.errors import ConfigError
from terabrain.nn.deep import DeepNetwork, DenseBank, LocalBank, RICALayer
from terabrain.nn.filter_maps import DenseMap, LocalMap
from terabrain.nn.shared_weight import unit_row_map_codes, unit_row_map_pair
from terabrain.nn.unit_rows import normalize_rows_, unit_rows
from terabrain.parallel.row_split import Axis, row_split
from terabrain.parallel.row_state import RowShard
from terabrain.parallel.spatial import (
    RowBlock, Rows, gather_halo, gather_rows, row_partition, rows_of_parameter,
    scatter_add_halo, split_evenly,
)


# --- collectives with their gradients ---------------------------------------------------------


class _SumOfParts(torch.autograd.Function):
    """Forward: the sum of every rank's part of a loss, and of ``logged`` (values logged
    beside it) in the same all-reduce: each collective a step waits for costs it more than
    its bytes (Link.sync_s). Backward: identity, since each rank differentiates its own part
    (the halo exchanges carry the cross-rank terms); ``logged`` has no gradient."""

    @staticmethod
    def forward(ctx, part, logged, axis):
        dtype = torch.promote_types(part.dtype, logged.dtype)
        both = torch.cat([part.detach().reshape(1).to(dtype), logged.detach().to(dtype)])
        dist.all_reduce(both, group=axis.group)
        summed = both[1:].to(logged.dtype, copy=True)
        ctx.mark_non_differentiable(summed)
        return both[0].to(part.dtype, copy=True).reshape(part.shape), summed

    @staticmethod
    def backward(ctx, grad, _):
        return grad, None, None


class _SummedGradient(torch.autograd.Function):
    """A replicated parameter: forward identity, backward the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, value, axis):
        ctx.axis = axis
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.axis.group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    """Row blocks -> the whole map on every rank; backward: the summed gradient's own rows."""

    @staticmethod
    def forward(ctx, block, blocks, axis):
        ctx.blocks, ctx.axis = blocks, axis
        return gather_rows(block.contiguous(), blocks, axis.group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.axis.group)
        start, stop = ctx.blocks[ctx.axis.rank]
        return grad[:, :, start:stop], None, None


class _ReduceToRows(torch.autograd.Function):
    """Partial whole maps -> each rank's rows of their sum; backward: all-gather."""

    @staticmethod
    def forward(ctx, partial, blocks, axis):
        ctx.blocks, ctx.axis = blocks, axis
        total = partial.detach().contiguous().clone()
        dist.all_reduce(total, group=axis.group)
        start, stop = blocks[axis.rank]
        return total[:, :, start:stop].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return gather_rows(grad.contiguous(), ctx.blocks, ctx.axis.group), None, None


def local_layer_blocks(owned: Sequence[Rows], height: int, padding: tuple[int, int],
                       kernel: int, stride: int) -> list[RowBlock]:
    """A local layer's row blocks when each rank holds ``owned`` rows of its unpadded input:
    the padding rows go to the first and last rank (so are every map's rows split
    ``split_evenly``; a planner calls this with those blocks, without a process group)."""
    before, after = padding
    last = len(owned) - 1
    padded = [(0 if r == 0 else a + before, height + before + after if r == last else b + before)
              for r, (a, b) in enumerate(owned)]
    return row_partition(height + before + after, kernel, stride, len(owned), padded)


# --- split layers -------------------------------------------------------------------------------


class _Filters(nn.Module):
    """Holds one bank's local filters under the name the whole layer uses (``weight``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class _SplitLayer(nn.Module):
    """This rank's part of a RICALayer. ``splits``: parameter name -> (dim, every rank's
    block along it); the others (``alpha``) are replicated. State dicts keep the whole
    layer's names and shapes: row-split values appear as RowShard, and a whole tensor
    (an exported model.safetensors) loads by taking this rank's block."""

    def __init__(self, layer: RICALayer, axis: Axis, device: torch.device):
        super().__init__()
        self.axis = axis
        self.in_shape, self.out_shape = layer.in_shape, layer.out_shape
        self.splits: dict[str, tuple[int, list[Rows]]] = {}
        alpha = torch.ones(()) if layer.alpha.device.type == "meta" else layer.alpha.detach().clone()
        self.alpha = nn.Parameter(alpha.to(device))
        self.tied = layer.decoder is None
        # The whole layer's state-dict names and shapes (see checkpoint_shard).
        self._register_state_dict_hook(_state_dict_hook)

    def _split(self, name: str, dim: int, blocks: Sequence[Rows]) -> None:
        self.splits[name] = (dim, list(blocks))

    def checkpoint_shard(self, name: str, tensor: torch.Tensor) -> Any:
        """``tensor`` as checkpointed for parameter ``name``: a RowShard when the parameter
        is row-split and ``tensor`` is shaped like its block (its optimizer state too)."""
        if name not in self.splits or tensor.shape != self.get_parameter(name).shape:
            return tensor
        dim, blocks = self.splits[name]
        return RowShard(tensor, dim, blocks, self.axis.rank, self.axis.group)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, (dim, blocks) in self.splits.items():
            key = prefix + name
            value = state_dict.get(key)
            if isinstance(value, RowShard):
                state_dict[key] = value.to_local()
            elif isinstance(value, torch.Tensor) and value.shape != self.get_parameter(name).shape:
                start, stop = blocks[self.axis.rank]
                state_dict[key] = value.narrow(dim, start, stop - start)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def alpha_summed(self) -> torch.Tensor:
        return _SummedGradient.apply(self.alpha, self.axis)

    def banks(self) -> list[nn.Module]:
        return [self.encoder] + ([] if self.tied else [self.decoder])

    @torch.no_grad()
    def normalize_(self) -> None:
        for weight in self._weights():
            normalize_rows_(weight)

    def filters(self) -> torch.Tensor:
        """This rank's units' filters, one per row."""
        weight = unit_rows(self._weights()[0].detach())
        return weight.reshape(-1, weight.shape[-1])


def _state_dict_hook(module: _SplitLayer, state_dict, prefix, local_metadata):
    for name in module.splits:
        key = prefix + name
        if key in state_dict:
            state_dict[key] = module.checkpoint_shard(name, state_dict[key])
    return state_dict


class RowSplitLocalLayer(_SplitLayer):
    """A locally connected RICA layer's block of output rows (see the module docstring).
    Input: this rank's unpadded rows ``owned_rows`` of (N, C, H, W); codes: its output rows;
    reconstruction: its input rows."""

    def __init__(self, layer: RICALayer, axis: Axis, owned: Sequence[Rows],
                 device: torch.device):
        super().__init__(layer, axis, device)
        _, height, width = layer.in_shape
        self.padding = layer.padding
        lc = layer.encoder.layer
        self.blocks = local_layer_blocks(owned, height, self.padding, lc.kernel_size, lc.stride)
        self.block = self.blocks[axis.rank]
        self.input_blocks = list(owned)
        self.owned_rows = owned[axis.rank]
        self.output_blocks = [b.output_rows for b in self.blocks]
        self.kernel_size, self.stride, self.block_bytes = lc.kernel_size, lc.stride, lc.block_bytes
        self.out_width, self.in_width = lc.output_size[1], width
        first, stop = self.block.output_rows
        self.output_rows = stop - first
        # The map of this rank's block: its halo-extended input rows to its output rows.
        self.fmap = LocalMap(self.kernel_size, self.stride, self._needed_size, self.block_bytes)
        locations = [(a * self.out_width, b * self.out_width) for a, b in self.output_blocks]
        self.encoder = nn.Module()
        self.encoder.layer = _Filters(_location_block(lc, first, self.output_rows, device))
        self._split("encoder.layer.weight", 0, locations)
        if not self.tied:
            self.decoder = nn.Module()
            self.decoder.layer = _Filters(_location_block(layer.decoder.layer, first, self.output_rows, device))
            self._split("decoder.layer.weight", 0, locations)
        a, b = self.owned_rows
        self.bias = nn.Parameter(_bias_block(layer, a, b, device))
        self._split("bias", 1, owned)
        self.normalize_()

    def _weights(self) -> list[torch.Tensor]:
        return [bank.layer.weight for bank in self.banks()]

    @property
    def _needed_size(self) -> tuple[int, int]:
        start, stop = self.block.needed_rows
        return stop - start, self.in_width + sum(self.padding)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.padding
        top = before if self.axis.rank == 0 else 0
        bottom = after if self.axis.rank == self.axis.size - 1 else 0
        return F.pad(x, [before, after, top, bottom]) if before or after else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        needed = gather_halo(self._pad(x), self.block, self.axis.group)
        return unit_row_map_codes(self.fmap, needed, self.encoder.layer.weight,
                                  self.alpha_summed())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = gather_halo(self._pad(x), self.block, self.axis.group)
        decoder = None if self.tied else self.decoder.layer.weight
        codes, needed = unit_row_map_pair(self.fmap, needed, self.encoder.layer.weight,
                                          decoder, self.alpha_summed())
        owned = scatter_add_halo(needed, self.block, self.axis.group)
        before, _ = self.padding
        top = before if self.axis.rank == 0 else 0
        rows = self.owned_rows[1] - self.owned_rows[0]
        reconstruction = owned[:, :, top : top + rows, before : before + self.in_width]
        return codes, reconstruction + self.bias


class UnitSplitDenseLayer(_SplitLayer):
    """A dense RICA layer's block of hidden units. Input: this rank's rows; codes: its units
    (N, units, 1, 1); reconstruction: its input rows."""

    def __init__(self, layer: RICALayer, axis: Axis, owned: Sequence[Rows], device: torch.device):
        super().__init__(layer, axis, device)
        maps = layer.out_shape[0]
        if maps < axis.size:
            raise ConfigError(f"parallel.model ({axis.size}) is larger than the {maps} hidden "
                              "units of the dense layer: they are split across the model axis")
        units = split_evenly(maps, axis.size)
        first, stop = units[axis.rank]
        self.input_blocks = list(owned)
        self.owned_rows = owned[axis.rank]
        for name, bank in zip(("encoder", "decoder"), layer.banks()):
            setattr(self, name, _Filters(_unit_block(bank, first, stop - first, device)))
            self._split(f"{name}.weight", 0, units)
        a, b = self.owned_rows
        self.bias = nn.Parameter(_bias_block(layer, a, b, device))
        self._split("bias", 1, owned)
        self.fmap = DenseMap(self.in_shape)  # the whole input to this rank's units
        self.normalize_()

    def _weights(self) -> list[torch.Tensor]:
        return [bank.weight for bank in self.banks()]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        whole = _GatherRows.apply(x, self.input_blocks, self.axis)
        return unit_row_map_codes(self.fmap, whole, self.encoder.weight, self.alpha_summed())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        whole = _GatherRows.apply(x, self.input_blocks, self.axis)
        decoder = None if self.tied else self.decoder.weight
        codes, partial = unit_row_map_pair(self.fmap, whole, self.encoder.weight, decoder,
                                           self.alpha_summed())
        return codes, _ReduceToRows.apply(partial, self.input_blocks, self.axis) + self.bias


def _location_block(layer, first_row: int, rows: int, device: torch.device) -> torch.Tensor:
    """The filters of output rows ``first_row ...`` (spatial.py's row slice of a layer)."""
    width = layer.output_size[1]
    return rows_of_parameter(layer, "weight", first_row * width, rows * width, device)


def _unit_block(bank: DenseBank, first: int, count: int, device: torch.device) -> torch.Tensor:
    if bank.weight.device.type != "meta":
        return bank.weight.detach().narrow(0, first, count).clone().to(device)
    block = torch.empty((count, bank.weight.shape[1]), dtype=bank.weight.dtype, device=device)
    bank.init_rows_(block, first)
    return block


def _bias_block(layer: RICALayer, start: int, stop: int, device: torch.device) -> torch.Tensor:
    if layer.bias.device.type != "meta":
        return layer.bias.detach()[:, start:stop].clone().to(device)
    return torch.zeros((layer.in_shape[0], stop - start, layer.in_shape[2]), device=device)


def _split_post(post: nn.Sequential, owned: Sequence[Rows], axis: Axis):
    """A layer's pooling and LCN on its output rows ``owned``, and the rows they hand on."""
    steps = []
    for step in post:
        steps.append(row_split(step, axis, owned))
        owned = steps[-1].output_blocks
    return nn.Sequential(*steps), owned


# --- the plan ------------------------------------------------------------------------------------


def partition_network(network: DeepNetwork, mesh: DeviceMesh,
                      device: torch.device = torch.device("cpu")) -> DeepNetwork:
    """Apply the spatial plan to ``network`` on the 1-D model ``mesh``, in place: its layers
    and post-processing become this rank's parts. Parameters of a meta-device network are
    created here, only this rank's blocks, with one process's initial values."""
    axis = Axis(mesh.get_group())
    height = network.input_shape[1]
    if height < axis.size:
        raise ConfigError(f"parallel.model ({axis.size}) is larger than the input's {height} "
                          "rows: spatial model parallelism splits rows across ranks")
    owned = split_evenly(height, axis.size)
    count = len(network.layers)
    for index, (layer, post) in enumerate(zip(list(network.layers), list(network.post))):
        where = f"model.layers[{index}]"
        if isinstance(layer.encoder, LocalBank):
            split = RowSplitLocalLayer(layer, axis, owned, device)
            blocks = split.output_blocks
        elif isinstance(layer.encoder, DenseBank):
            if index != count - 1 or len(post):
                raise ConfigError(f"{where}: with parallel.model > 1 a dense layer must be the "
                                  "top layer, without pooling or LCN after it")
            split = UnitSplitDenseLayer(layer, axis, owned, device)
            blocks = owned
        else:
            raise ConfigError(f"{where}: kind conv is not split across the model axis; allowed "
                              "with parallel.model > 1: local, dense (top layer); use "
                              "parallel.data for conv networks")
        network.layers[index] = split
        if isinstance(split, RowSplitLocalLayer):
            network.post[index], owned = _split_post(post, blocks, axis)
    return network


def model_axis(network: DeepNetwork) -> Optional[Axis]:
    layer = network.layers[0]
    return layer.axis if isinstance(layer, _SplitLayer) else None


def sum_of_parts(part: torch.Tensor, logged: torch.Tensor, axis: Axis) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over the model axis of every rank's ``part`` of a loss and of its
    ``logged`` values (one all-reduce); the loss's backward is the identity, since each
    rank differentiates its own part."""
    return _SumOfParts.apply(part, logged, axis)


def whole_tensor_count(network: DeepNetwork) -> int:
    """Parameters of the whole network (not this rank's share)."""
    count = 0
    for layer in network.layers:
        for name, parameter in layer.named_parameters():
            shape = list(parameter.shape)
            if isinstance(layer, _SplitLayer) and name in layer.splits:
                dim, blocks = layer.splits[name]
                shape[dim] = blocks[-1][1]
            count += math.prod(shape)
    return count
