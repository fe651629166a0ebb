"""Spatial model parallelism for locally connected layers: seed 003's "distributed array".

A locally connected layer's ``Ho`` output rows are split into contiguous blocks, one per rank
of the model axis; each rank holds the filters of its rows' locations only (no weight is
ever replicated or summed across ranks). Its input arrives split by rows too. A block of
output rows reads input rows ``[r0 s, (r1 - 1) s + k)``: the rows it owns plus, for
overlapping fields (``k > s``), a *halo* of ``k - s`` rows owned by the next rank(s). Each
rank receives exactly those rows from their owners by point-to-point messages (no
collective, no full input anywhere); the backward pass sends the halo's gradient back to
the owner, which adds it to its own. ``transpose`` (the reconstruction) runs the same
exchange the other way round: each rank's fields write into the halo rows too, and those
partial sums go to the rows' owners.

The layout math lives in pure functions (``row_partition``, ``halo_bytes``, in
terabrain/parallel/halo.py with the exchange itself) so a planner can count rows and bytes
without a process group. Parallelism is applied as a plan, ``partition_spatially(model,
mesh)``, which swaps each ``LocallyConnected2d`` for a ``RowPartitionedLocallyConnected2d``
holding this rank's rows, and each ``LocalContrastNorm`` (seed 000 normalises after every
layer) and pooling module for their row-split versions (terabrain/parallel/row_split.py,
shared with ``partition_network``) on the rows the layers hand on; the model code is
unchanged.

Per layer and forward pass a rank receives ``N C W (k - s)`` values (one halo) and sends as
many, against ``N C W H / P`` values of its own input; the backward pass moves the same
amount back. For seed 000's first layer (k 16, s 4) that is 12 input rows per block.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from terabrain.nn.local import LocallyConnected2d, locally_connected, locally_connected_transpose
from terabrain.nn.normalization import LocalContrastNorm
from terabrain.parallel.halo import (  # noqa: F401  (re-exported: the spatial plan's API)
    RowBlock, Rows, exchange_plan, gather_halo, gather_rows, halo_bytes, row_partition,
    scatter_add_halo, scatter_rows, split_evenly, split_rows, tiled_height,
)
from terabrain.parallel.row_split import ROW_SPLIT_STEPS, Axis, row_split


# --- the partitioned layer -------------------------------------------------------------------


class RowPartitionedLocallyConnected2d(nn.Module):
    """This rank's output rows of a ``LocallyConnected2d``: same ``forward``/``transpose``
    signatures, on row blocks (input: the owned rows, ``(N, C, owned, W)``; output: the
    output rows, ``(N, F, rows, Wo)``). ``weight`` holds those rows' locations only."""

    def __init__(self, layer: LocallyConnected2d, group: dist.ProcessGroup,
                 owned: Optional[Sequence[Rows]] = None, device: Optional[torch.device] = None):
        super().__init__()
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        self.blocks = row_partition(layer.input_size[0], layer.kernel_size, layer.stride, ranks,
                                    owned)
        self.block, self.group = self.blocks[rank], group
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.input_size, self.output_size = layer.input_size, layer.output_size
        self.block_bytes = layer.block_bytes
        self.init_seed = layer.init_seed
        first, last = self.block.output_rows
        width = layer.output_size[1]
        self.weight = nn.Parameter(rows_of_parameter(
            layer, "weight", first * width, (last - first) * width, device),
            requires_grad=layer.weight.requires_grad)  # a frozen layer stays frozen
        self.bias = None if layer.bias is None else nn.Parameter(rows_of_parameter(
            layer, "bias", first, last - first, device), requires_grad=layer.bias.requires_grad)

    @property
    def output_blocks(self) -> list[Rows]:
        return [block.output_rows for block in self.blocks]

    @property
    def local_output_size(self) -> tuple[int, int]:
        first, last = self.block.output_rows
        return last - first, self.output_size[1]

    @property
    def needed_size(self) -> tuple[int, int]:
        start, stop = self.block.needed_rows
        return stop - start, self.input_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.block.owned_rows[1] - self.block.owned_rows[0]
        if x.dim() != 4 or x.shape[2] != expected:
            raise ValueError(f"rank {self.block.rank}: expected its {expected} input rows "
                             f"{self.block.owned_rows} as (N, C, rows, W), got {tuple(x.shape)}")
        needed = gather_halo(x, self.block, self.group)
        y = locally_connected(needed, self.weight, self.kernel_size, self.stride,
                              self.local_output_size, self.block_bytes)
        return y if self.bias is None else y + self.bias

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        needed = locally_connected_transpose(y, self.weight, self.kernel_size, self.stride,
                                             self.needed_size, self.block_bytes)
        return scatter_add_halo(needed, self.block, self.group)

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.div_(self.weight.norm(dim=2, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """The whole layer's parameters on every rank, as a single-process
        ``LocallyConnected2d``'s state dict (a collective over the model axis): for
        exporting weights and pictures."""
        width = self.output_size[1]
        rows = [block.output_rows for block in self.blocks]
        full = {"weight": gather_rows(self.weight, [(a * width, b * width) for a, b in rows],
                                      self.group, dim=0)}
        if self.bias is not None:
            full["bias"] = gather_rows(self.bias, rows, self.group, dim=1)
        return full

    def filters(self) -> torch.Tensor:
        """This rank's units' rows (its locations, row-major)."""
        return self.weight.detach().reshape(-1, self.weight.shape[-1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, rank "
                f"{self.block.rank}: output rows {self.block.output_rows}, input rows "
                f"{self.block.owned_rows} + halo {self.block.halo_rows}")


def rows_of_parameter(layer: LocallyConnected2d, name: str, first: int, count: int,
                       device: Optional[torch.device]) -> torch.Tensor:
    """The slice of ``layer``'s parameter along its row dimension: copied from a real
    parameter, or created and initialised here for a layer built on the meta device (the
    values equal the whole layer's)."""
    parameter = getattr(layer, name)
    dim = layer.row_dims[name]
    if parameter.device.type != "meta":
        local = parameter.detach().narrow(dim, first, count).clone()
        return local.to(device) if device is not None else local
    shape = list(parameter.shape)
    shape[dim] = count
    local = torch.empty(shape, dtype=parameter.dtype, device=device or torch.device("cpu"))
    layer.init_parameter_(name, local, first)
    return local


def _model_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    if mesh.mesh_dim_names and "model" in mesh.mesh_dim_names:
        return mesh.get_group("model")
    if mesh.ndim != 1:
        raise ValueError("spatial plan: a 1-D mesh or a mesh with a 'model' dimension")
    return mesh.get_group()


def partition_spatially(model: nn.Module, mesh: DeviceMesh,
                        device: Optional[torch.device] = None) -> nn.Module:
    """Apply the spatial plan along the mesh's model axis: every ``LocallyConnected2d`` in
    ``model`` (or ``model`` itself) becomes this rank's ``RowPartitionedLocallyConnected2d``,
    every ``LocalContrastNorm`` a ``RowSplitLCN`` and every pooling module (``L2Pool2d``,
    ``nn.MaxPool2d``, ``nn.AvgPool2d``) a ``RowSplitPool`` (terabrain.parallel.row_split).
    Returns the model (a new module when ``model`` is itself a locally connected layer).

    Modules are taken in registration order (execution order for ``nn.Sequential``). A
    module whose input rows are the previous partitioned module's output rows keeps that
    module's row blocks as its own input rows, so stacked layers pass their outputs on
    without re-partitioning (only halos move). An LCN before the first locally connected
    layer works on that layer's input rows; pooling must follow one."""
    group = _model_group(mesh)
    if isinstance(model, LocallyConnected2d):
        return RowPartitionedLocallyConnected2d(model, group, device=device)
    if isinstance(model, ROW_SPLIT_STEPS):
        raise ValueError(f"spatial plan: a {type(model).__name__} alone has no row blocks to "
                         "follow; partition the model it belongs to")
    axis = Axis(group)
    layers = [(name, child) for name, child in model.named_modules()
              if isinstance(child, (LocallyConnected2d, *ROW_SPLIT_STEPS))]
    previous: Optional[nn.Module] = None  # the last partitioned module
    for index, (name, child) in enumerate(layers):
        if isinstance(child, LocallyConnected2d):
            owned = None
            if previous is not None and tiled_height(previous.output_blocks) == child.input_size[0]:
                owned = previous.output_blocks
            replacement = RowPartitionedLocallyConnected2d(child, group, owned, device)
        elif previous is not None:
            replacement = row_split(child, axis, previous.output_blocks)
        elif isinstance(child, LocalContrastNorm):
            following = next((c for _, c in layers[index:] if isinstance(c, LocallyConnected2d)),
                             None)
            if following is None:
                continue  # no spatially split layer: nothing to follow
            replacement = row_split(child, axis, [b.owned_rows for b in row_partition(
                following.input_size[0], following.kernel_size, following.stride, axis.size)])
        else:
            raise ValueError(f"spatial plan: {name} (pooling) comes before any locally "
                             "connected layer, so its rows are not known")
        owner_name, _, leaf = name.rpartition(".")
        (model.get_submodule(owner_name) if owner_name else model).register_module(leaf, replacement)
        previous = replacement
    return model
