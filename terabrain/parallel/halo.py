"""Rows of a map split across the ranks of the model axis, and the halo exchange between
them: Coates et al. 2013's "distributed array" for maps split by rows.

Each rank holds a contiguous block of rows (``owned``) and reads a possibly larger block
(``needed``): the rows of its own plus a *halo* owned by neighbours. ``exchange_plan`` says
who sends which rows to whom; ``gather_halo`` does it with point-to-point messages (no
collective, no full map anywhere), and ``scatter_add_halo`` is its adjoint (values on halo
rows go back to their owners and are added), so each is the other's backward pass. The
layout functions are pure (no process group), for planners.

Tensors are exchanged batch-last, ``(rows, W, C, N)``, the layout the locally connected
layer computes in: rows are contiguous there, so messages are sent from and received into
place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from terabrain.errors import ConfigError
from terabrain.nn.local import batch_first, batch_last

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


def tiled_height(blocks: Sequence[Rows]) -> Optional[int]:
    """The height of the map whose rows ``blocks`` tile from row 0 without gap or overlap
    (in any order), or None when they do not."""
    covered = sorted(tuple(block) for block in blocks)
    if not covered or covered[0][0] != 0 or any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        return None
    return covered[-1][1]


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
        if len(owned) != ranks or tiled_height(owned) != input_rows:
            raise ValueError(f"owned input rows {owned} must tile 0..{input_rows} across "
                             f"{ranks} ranks")
    needed = [(first * stride, (last - 1) * stride + kernel_size) for first, last in outputs]
    return exchange_plan(owned, needed, outputs)


def exchange_plan(owned: Sequence[Rows], needed: Sequence[Rows],
                  outputs: Optional[Sequence[Rows]] = None) -> list[RowBlock]:
    """Who sends which rows to whom, when rank ``i`` holds rows ``owned[i]`` and reads
    ``needed[i]``: each rank receives every needed row it does not own from its owner.
    ``outputs`` (default: ``owned``) are the rows each rank produces."""
    ranks = len(owned)
    outputs = list(owned) if outputs is None else list(outputs)
    blocks = []
    for rank in range(ranks):
        receives = tuple((peer, rows) for peer in range(ranks) if peer != rank
                         for rows in [_intersect(owned[peer], needed[rank])] if rows)
        sends = tuple((peer, rows) for peer in range(ranks) if peer != rank
                      for rows in [_intersect(owned[rank], needed[peer])] if rows)
        blocks.append(RowBlock(rank, tuple(outputs[rank]), tuple(owned[rank]),
                               tuple(needed[rank]), receives, sends))
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


def exchange_messages(outgoing: list[tuple[int, torch.Tensor]],
                      incoming: list[tuple[int, torch.Tensor]], group: dist.ProcessGroup) -> None:
    """Post every send and receive at once (no ordering deadlock), then wait for all; peers
    are ranks of ``group``. (terabrain calibrate times this call as the halo makes it.)"""
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


def _gather(x: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's owned input rows -> the needed rows (owned ones + halo from peers), both
    batch-last (rows, W, C, N)."""
    needed = x.new_empty((block.needed_rows[1] - block.needed_rows[0], *x.shape[1:]))
    mine = _intersect(block.owned_rows, block.needed_rows)
    if mine:
        _rows(needed, mine, block.needed_rows[0]).copy_(_rows(x, mine, block.owned_rows[0]))
    outgoing = [(peer, _rows(x, rows, block.owned_rows[0])) for peer, rows in block.sends]
    incoming = [(peer, _rows(needed, rows, block.needed_rows[0])) for peer, rows in block.receives]
    exchange_messages(outgoing, incoming, group)
    return needed


def _scatter_add(needed: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> torch.Tensor:
    """The adjoint of ``_gather``: values on the needed rows -> owned rows, each halo
    row's values added to its owner's (batch-last)."""
    owned = needed.new_zeros((block.owned_rows[1] - block.owned_rows[0], *needed.shape[1:]))
    mine = _intersect(block.owned_rows, block.needed_rows)
    if mine:
        _rows(owned, mine, block.owned_rows[0]).copy_(_rows(needed, mine, block.needed_rows[0]))
    outgoing = [(peer, _rows(needed, rows, block.needed_rows[0])) for peer, rows in block.receives]
    incoming = [(peer, needed.new_empty((rows[1] - rows[0], *needed.shape[1:])))
                for peer, rows in block.sends]
    exchange_messages(outgoing, incoming, group)
    for (_, rows), (_, values) in zip(block.sends, incoming):
        _rows(owned, rows, block.owned_rows[0]).add_(values)
    return owned


def gather_halo(x: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, C, owned rows, W) -> (N, C, needed rows, W), differentiable: the backward pass
    returns the halo's gradient to its owners (``scatter_add_halo``)."""
    return _GatherHalo.apply(x, block, group)


def scatter_add_halo(needed: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, C, needed rows, W) -> (N, C, owned rows, W), halo rows added to their owners';
    differentiable (the backward pass is ``gather_halo``)."""
    return _ScatterAddHalo.apply(needed, block, group)


class _GatherHalo(torch.autograd.Function):
    """(N, C, owned rows, W) -> (N, C, needed rows, W); exchanged batch-last, the layout the
    locally connected layer computes in, so neither side copies to change layout."""

    @staticmethod
    def forward(ctx, x, block, group):
        ctx.block, ctx.group = block, group
        return batch_first(_gather(batch_last(x), block, group))

    @staticmethod
    def backward(ctx, grad):
        return batch_first(_scatter_add(batch_last(grad), ctx.block, ctx.group)), None, None


class _ScatterAddHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, needed, block, group):
        ctx.block, ctx.group = block, group
        return batch_first(_scatter_add(batch_last(needed), block, group))

    @staticmethod
    def backward(ctx, grad):
        return batch_first(_gather(batch_last(grad), ctx.block, ctx.group)), None, None


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
        exchange_messages(outgoing, [], group)
        return x[:, :, start:stop].clone()
    local = torch.empty(stop - start, w, c, n, dtype=dtype)
    exchange_messages([], [(src, local)], group)
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
