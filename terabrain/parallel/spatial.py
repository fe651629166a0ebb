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

The layout math lives in pure functions (``row_partition``, ``halo_bytes``) so a planner
can count rows and bytes without a process group. Parallelism is applied as a plan,
``partition_spatially(model, mesh)``, which swaps each ``LocallyConnected2d`` for a
``RowPartitionedLocallyConnected2d`` holding this rank's rows; the model code is unchanged.

Per layer and forward pass a rank receives ``N C W (k - s)`` values (one halo) and sends as
many, against ``N C W H / P`` values of its own input; the backward pass moves the same
amount back. For seed 000's first layer (k 16, s 4) that is 12 input rows per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from terabrain.errors import ConfigError
from terabrain.nn.local import (
    LocallyConnected2d, batch_first, batch_last, locally_connected,
    locally_connected_transpose,
)

Rows = tuple[int, int]  # [start, stop)


@dataclass(frozen=True)
class RowBlock:
    """One rank's share of a layer, in rows of the full maps."""

    rank: int
    output_rows: Rows   # output rows (locations) it computes and holds the filters of
    owned_rows: Rows    # input rows it holds
    needed_rows: Rows   # input rows its fields read: owned ones and the halo
    receives: tuple[tuple[int, Rows], ...]  # (from rank, input rows) that it lacks
    sends: tuple[tuple[int, Rows], ...]     # (to rank, input rows) of its own that others need

    @property
    def halo_rows(self) -> int:
        return sum(stop - start for _, (start, stop) in self.receives)


def split_evenly(total: int, parts: int) -> list[Rows]:
    """``total`` rows in ``parts`` contiguous blocks, the first ``total % parts`` one longer."""
    base, extra = divmod(total, parts)
    blocks, start = [], 0
    for part in range(parts):
        stop = start + base + (part < extra)
        blocks.append((start, stop))
        start = stop
    return blocks


def _intersect(a: Rows, b: Rows) -> Optional[Rows]:
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return (start, stop) if start < stop else None


def row_partition(input_rows: int, kernel_size: int, stride: int, ranks: int,
                  owned: Optional[Sequence[Rows]] = None) -> list[RowBlock]:
    """Each rank's output rows, owned input rows, needed input rows and halo messages.

    Output rows are split evenly. Unless ``owned`` gives the input rows each rank already
    holds (say, the previous layer's output rows), rank ``i`` owns the input rows from its
    first field's start up to the next rank's (the last rank: to the bottom edge), so only
    overlapping fields need a halo. Raises ConfigError when there are fewer output rows than
    ranks: a rank would hold nothing."""
    output_rows = (input_rows - kernel_size) // stride + 1
    if output_rows < ranks:
        raise ConfigError(
            f"parallel.model ({ranks}) is larger than the {output_rows} output rows of a "
            f"locally connected layer (input {input_rows} rows, kernel {kernel_size}, stride "
            f"{stride}): spatial model parallelism splits output rows across ranks")
    outputs = split_evenly(output_rows, ranks)
    if owned is None:
        starts = [first * stride for first, _ in outputs] + [input_rows]
        owned = [(starts[r], starts[r + 1]) for r in range(ranks)]
    else:
        owned = [tuple(block) for block in owned]
        covered = sorted(owned)
        if len(owned) != ranks or covered[0][0] != 0 or covered[-1][1] != input_rows or any(
                a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ValueError(f"owned input rows {owned} must tile 0..{input_rows} across "
                             f"{ranks} ranks")
    needed = [(first * stride, (last - 1) * stride + kernel_size) for first, last in outputs]
    blocks = []
    for rank in range(ranks):
        receives = tuple((peer, rows) for peer in range(ranks) if peer != rank
                         for rows in [_intersect(owned[peer], needed[rank])] if rows)
        sends = tuple((peer, rows) for peer in range(ranks) if peer != rank
                      for rows in [_intersect(owned[rank], needed[peer])] if rows)
        blocks.append(RowBlock(rank, outputs[rank], owned[rank], needed[rank], receives, sends))
    return blocks


def halo_bytes(input_size: tuple[int, int], channels: int, kernel_size: int, stride: int,
               ranks: int, batch: int, bytes_per_value: int = 4,
               owned: Optional[Sequence[Rows]] = None) -> list[dict[str, int]]:
    """Per rank, bytes sent and received by one forward pass of one layer (the backward
    pass sends the same amounts the other way; ``transpose`` likewise). ``owned`` as in
    ``row_partition`` (a stacked layer owns the previous layer's output rows)."""
    height, width = input_size
    row_bytes = batch * channels * width * bytes_per_value
    return [
        {"rank": block.rank,
         "sent": sum(stop - start for _, (start, stop) in block.sends) * row_bytes,
         "received": sum(stop - start for _, (start, stop) in block.receives) * row_bytes}
        for block in row_partition(height, kernel_size, stride, ranks, owned)
    ]


# --- the exchange ----------------------------------------------------------------------------


def _exchange(outgoing: list[tuple[int, torch.Tensor]], incoming: list[tuple[int, torch.Tensor]],
              group: dist.ProcessGroup) -> None:
    """Post every send and receive at once (no ordering deadlock), then wait for all."""
    ops = [dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, peer), group)
           for peer, tensor in outgoing]
    ops += [dist.P2POp(dist.irecv, tensor, dist.get_global_rank(group, peer), group)
            for peer, tensor in incoming]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _rows(x: torch.Tensor, rows: Rows, origin: int) -> torch.Tensor:
    """Rows of a batch-last (H, W, C, N) tensor whose first row is ``origin``: a contiguous
    slice, so messages are sent from and received into place, without packing."""
    return x[rows[0] - origin : rows[1] - origin]


def gather_halo(x: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's owned input rows -> the needed rows (owned ones + halo from peers), both
    batch-last (rows, W, C, N)."""
    needed = x.new_empty((block.needed_rows[1] - block.needed_rows[0], *x.shape[1:]))
    mine = _intersect(block.owned_rows, block.needed_rows)
    if mine:
        _rows(needed, mine, block.needed_rows[0]).copy_(_rows(x, mine, block.owned_rows[0]))
    outgoing = [(peer, _rows(x, rows, block.owned_rows[0])) for peer, rows in block.sends]
    incoming = [(peer, _rows(needed, rows, block.needed_rows[0])) for peer, rows in block.receives]
    _exchange(outgoing, incoming, group)
    return needed


def scatter_add_halo(needed: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> torch.Tensor:
    """The adjoint of ``gather_halo``: values on the needed rows -> owned rows, each halo
    row's values added to its owner's (batch-last)."""
    owned = needed.new_zeros((block.owned_rows[1] - block.owned_rows[0], *needed.shape[1:]))
    mine = _intersect(block.owned_rows, block.needed_rows)
    if mine:
        _rows(owned, mine, block.owned_rows[0]).copy_(_rows(needed, mine, block.needed_rows[0]))
    outgoing = [(peer, _rows(needed, rows, block.needed_rows[0])) for peer, rows in block.receives]
    incoming = [(peer, needed.new_empty((rows[1] - rows[0], *needed.shape[1:])))
                for peer, rows in block.sends]
    _exchange(outgoing, incoming, group)
    for (_, rows), (_, values) in zip(block.sends, incoming):
        _rows(owned, rows, block.owned_rows[0]).add_(values)
    return owned


class _GatherHalo(torch.autograd.Function):
    """(N, C, owned rows, W) -> (N, C, needed rows, W); exchanged batch-last, the layout the
    locally connected layer computes in, so neither side copies to change layout."""

    @staticmethod
    def forward(ctx, x, block, group):
        ctx.block, ctx.group = block, group
        return batch_first(gather_halo(batch_last(x), block, group))

    @staticmethod
    def backward(ctx, grad):
        return batch_first(scatter_add_halo(batch_last(grad), ctx.block, ctx.group)), None, None


class _ScatterAddHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, needed, block, group):
        ctx.block, ctx.group = block, group
        return batch_first(scatter_add_halo(batch_last(needed), block, group))

    @staticmethod
    def backward(ctx, grad):
        return batch_first(gather_halo(batch_last(grad), ctx.block, ctx.group)), None, None


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
        self.weight = nn.Parameter(_rows_of_parameter(
            layer, "weight", first * width, (last - first) * width, device))
        self.bias = None if layer.bias is None else nn.Parameter(_rows_of_parameter(
            layer, "bias", first, last - first, device))

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
        needed = _GatherHalo.apply(x, self.block, self.group)
        y = locally_connected(needed, self.weight, self.kernel_size, self.stride,
                              self.local_output_size, self.block_bytes)
        return y if self.bias is None else y + self.bias

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        needed = locally_connected_transpose(y, self.weight, self.kernel_size, self.stride,
                                             self.needed_size, self.block_bytes)
        return _ScatterAddHalo.apply(needed, self.block, self.group)

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


def _rows_of_parameter(layer: LocallyConnected2d, name: str, first: int, count: int,
                       device: Optional[torch.device]) -> torch.Tensor:
    """The slice of ``layer``'s parameter along its row dimension: copied from a real
    parameter, or created and initialised here for a layer built on the meta device (the
    values equal the whole layer's)."""
    parameter = getattr(layer, name)
    dim = layer.row_dims[name]
    if parameter.device.type != "meta":
        return parameter.detach().narrow(dim, first, count).clone()
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
    """Apply the spatial plan: every ``LocallyConnected2d`` in ``model`` (or ``model``
    itself) is replaced by this rank's ``RowPartitionedLocallyConnected2d`` along the mesh's
    model axis. Returns the model (a new module when ``model`` is itself the layer).

    A layer whose input rows are the previous replaced layer's output rows keeps the
    previous layer's row blocks as its input ownership, so stacked layers pass their
    outputs on without re-partitioning (only halos move)."""
    group = _model_group(mesh)
    if isinstance(model, LocallyConnected2d):
        return RowPartitionedLocallyConnected2d(model, group, device=device)
    previous: Optional[RowPartitionedLocallyConnected2d] = None
    for name, child in list(model.named_modules()):
        if not isinstance(child, LocallyConnected2d):
            continue
        owned = None
        if previous is not None and previous.output_size[0] == child.input_size[0]:
            owned = [block.output_rows for block in previous.blocks]
        replacement = RowPartitionedLocallyConnected2d(child, group, owned, device)
        owner_name, _, leaf = name.rpartition(".")
        (model.get_submodule(owner_name) if owner_name else model).register_module(leaf, replacement)
        previous = replacement
    return model


# --- moving whole maps in and out ------------------------------------------------------------


def split_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """This rank's rows of a full (N, C, H, W) tensor every rank holds (differentiable)."""
    return x[:, :, rows[0] : rows[1]]


def scatter_rows(x: Optional[torch.Tensor], blocks: Sequence[Rows], group: dist.ProcessGroup,
                 src: int = 0) -> torch.Tensor:
    """Rank ``src`` (of ``group``) holds the full (N, C, H, W) tensor and sends every other
    rank its block of rows; returns this rank's rows (shape and dtype come from ``src``).
    Not differentiable."""
    rank = dist.get_rank(group)
    meta = [(tuple(x.shape), x.dtype) if rank == src else None]
    dist.broadcast_object_list(meta, dist.get_global_rank(group, src), group=group)
    (n, c, _, w), dtype = meta[0]
    start, stop = blocks[rank]
    if rank == src:
        outgoing = [(peer, batch_last(x[:, :, a:b]).contiguous())
                    for peer, (a, b) in enumerate(blocks) if peer != src]
        _exchange(outgoing, [], group)
        return x[:, :, start:stop].clone()
    local = torch.empty(stop - start, w, c, n, dtype=dtype)
    _exchange([], [(src, local)], group)
    return batch_first(local)


def gather_rows(local: torch.Tensor, blocks: Sequence[Rows], group: dist.ProcessGroup,
                dim: int = 2) -> torch.Tensor:
    """The full tensor on every rank from each rank's block of rows along ``dim`` (uneven
    blocks allowed; not differentiable)."""
    longest = max(stop - start for start, stop in blocks)
    shape = list(local.shape)
    shape[dim] = longest
    padded = local.new_zeros(shape)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    pieces = [torch.empty_like(padded) for _ in blocks]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece.narrow(dim, 0, stop - start)
                      for piece, (start, stop) in zip(pieces, blocks)], dim=dim)
