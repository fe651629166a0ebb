"""LCN and pooling on maps split by rows across the model axis, as the spatial plan
(``terabrain.parallel.spatial_network.partition_network``) uses them after its layers.

A map's layout is its row blocks, ``owned[i] = (start, stop)`` for rank ``i``, tiling rows
``0 .. height`` in rank order; tensors are batch-first ``(N, C, rows, W)`` (the halo
exchange turns them batch-last only while rows travel). Each module takes the layout of its
input and gives ``output_blocks``, the layout of its output, which the next module takes
as its own: outputs pass on without re-partitioning, only halos move.

- LCN keeps its input's rows. Its Gaussian windows reach ``r = kernel_size // 2`` rows
  across block edges twice (local mean, then local spread of the centred values), so each
  rank gathers ``2 r`` rows from each side; the per-image mean spread, LCN's floor, is one
  differentiable all-reduce of ``N`` sums.
- Pooling (L2, max, average) splits its output rows evenly; each rank gathers the input
  rows its windows read (a halo where windows cross block edges). L2 pooling's zero
  padding is added only at the map's own top and bottom edges.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from terabrain.errors import ConfigError
from terabrain.nn.normalization import (
    LocalContrastNorm, centre_and_spread, divide, gaussian_window, window_sigma,
)
from terabrain.nn.pooling import L2Pool2d
from terabrain.parallel.halo import Rows, exchange_plan, gather_halo, split_evenly, tiled_height

POOLING = (L2Pool2d, nn.MaxPool2d, nn.AvgPool2d)


class Axis:
    """The model axis' process group. Deep copies of split modules (layer-wise training's
    forward copies) share it: a process group cannot be copied."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def __deepcopy__(self, memo):
        return self


class AllReduce(torch.autograd.Function):
    """A sum every rank uses: forward and backward all-reduce (torch.distributed.nn's
    all_reduce does the same but is deprecated and warns at every call)."""

    @staticmethod
    def forward(ctx, value, axis):
        ctx.axis = axis
        total = value.detach().contiguous().clone()
        dist.all_reduce(total, group=axis.group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.axis.group)
        return grad, None


def _height(owned: Sequence[Rows]) -> int:
    height = tiled_height(owned)
    if height is None:
        raise ValueError(f"row blocks {list(owned)} must tile a map's rows from row 0")
    return height


class _RowWindows(nn.Module):
    """A window operation on a map split by rows: this rank checks it got its own rows and
    gathers the rows its windows read (``self.blocks``, one RowBlock per rank)."""

    def __init__(self, axis: Axis, owned: Sequence[Rows], height: int, needed: Sequence[Rows],
                 outputs: Sequence[Rows]):
        super().__init__()
        self.axis, self.height = axis, height
        self.blocks = exchange_plan(owned, needed, outputs)
        self.block = self.blocks[axis.rank]
        self.output_blocks = [block.output_rows for block in self.blocks]

    def _band(self, x: torch.Tensor) -> torch.Tensor:
        start, stop = self.block.owned_rows
        if x.dim() != 4 or x.shape[2] != stop - start:
            raise ValueError(f"rank {self.block.rank}: expected its {stop - start} rows "
                             f"{self.block.owned_rows} as (N, C, rows, W), got {tuple(x.shape)}")
        return gather_halo(x, self.block, self.axis.group)


class RowSplitLCN(_RowWindows):
    """``LocalContrastNorm`` on this rank's rows of a map split by rows: the same values as
    on the whole map (the windows are cut at the map's edges, not the block's)."""

    def __init__(self, lcn: LocalContrastNorm, axis: Axis, owned: Sequence[Rows]):
        reach, height = 2 * (lcn.kernel_size // 2), _height(owned)
        needed = [(max(0, start - reach), min(height, stop + reach)) for start, stop in owned]
        super().__init__(axis, owned, height, needed, owned)
        self.kernel_size, self.sigma, self.eps = lcn.kernel_size, lcn.sigma, lcn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = gaussian_window(self.kernel_size, window_sigma(self.kernel_size, self.sigma),
                               x.dtype, x.device)
        # The band holds 2r rows beyond this rank's own on each inner side: its own rows'
        # windows never reach a cut that is not the map's edge (terabrain.nn.normalization).
        centred, spread = centre_and_spread(self._band(x), taps)
        (start, stop), first = self.block.owned_rows, self.block.needed_rows[0]
        mine = slice(start - first, stop - first)
        centred, spread = centred[:, :, mine], spread[:, :, mine]
        total = AllReduce.apply(spread.sum(dim=(2, 3), keepdim=True), self.axis)
        return divide(centred, spread, total / (self.height * x.shape[3]), self.eps)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, sigma={self.sigma}, rank {self.block.rank}: "
                f"rows {self.block.owned_rows} + halo {self.block.halo_rows}")


class RowSplitPool(_RowWindows):
    """A pooling module (``L2Pool2d``, ``nn.MaxPool2d``, ``nn.AvgPool2d``) on a map split by
    rows: output rows split evenly, each rank pooling the input rows its windows read."""

    def __init__(self, pool: nn.Module, axis: Axis, owned: Sequence[Rows]):
        pair = nn.modules.utils._pair
        kernel = pair(pool.kernel_size)
        stride = pair(pool.stride or pool.kernel_size)
        padding = pair(pool.padding)
        if getattr(pool, "ceil_mode", False) or pair(getattr(pool, "dilation", 1)) != (1, 1):
            raise ConfigError("parallel.model > 1: pooling with ceil_mode or dilation is not "
                              "split across ranks")
        if any(padding) and not isinstance(pool, L2Pool2d):
            raise ConfigError("parallel.model > 1: padded max or average pooling is not split "
                              "across ranks (padded L2 pooling is)")
        (kh, _), (sh, _), (ph, pw) = kernel, stride, padding
        height = _height(owned)
        out_rows = (height + 2 * ph - kh) // sh + 1
        if out_rows < axis.size:
            raise ConfigError(f"parallel.model ({axis.size}) is larger than the {out_rows} "
                              "output rows of a pooling layer")
        outputs = split_evenly(out_rows, axis.size)
        needed = [(max(0, a * sh - ph), min(height, (b - 1) * sh - ph + kh)) for a, b in outputs]
        super().__init__(axis, owned, height, needed, outputs)
        # Padding rows exist only at the map's top and bottom edges: added here to the
        # band of the ranks that have them, so the pool itself pads columns only.
        first, last = self.block.output_rows
        self.edges = (max(0, ph - first * sh), max(0, (last - 1) * sh - ph + kh - height))
        self.pool = pool if not ph else L2Pool2d(kernel, stride, (0, pw), pool.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = self._band(x)
        if any(self.edges):
            band = F.pad(band, (0, 0, *self.edges))
        return self.pool(band)


def row_split(step: nn.Module, axis: Axis, owned: Sequence[Rows]) -> nn.Module:
    """``step`` (LCN or pooling) on this rank's rows ``owned[axis.rank]`` of its input."""
    if isinstance(step, LocalContrastNorm):
        return RowSplitLCN(step, axis, owned)
    if isinstance(step, POOLING):
        return RowSplitPool(step, axis, owned)
    raise ConfigError(f"parallel.model > 1: no row split for {type(step).__name__}")
