"""The untied locally connected layer of Ni et al. 2015 and Coates et al. 2013: every output location has its own
filters over its own k x k receptive field (no weight sharing, no padding).

How it is computed (Coates et al. 2013, "small dense multiplies"): the ``F = out_channels`` units at
one location share a receptive field, so a location is one dense GEMM
``(F, K) @ (K, N)`` with ``K = k k C``, and a block of locations is one batched GEMM
``(L, F, K) @ (L, K, N)``. Neither a loop over locations in Python nor a dense masked
``(C H W) x (F L)`` matrix, which would be mostly zeros.

Layout: the layer computes batch-last, ``(H, W, C, N)``. A kernel row of a field is then
``k C N`` consecutive values, so cutting the patches is a copy of long contiguous runs (in
``(N, C, H, W)`` the runs are ``k`` values long: ~5x slower here), and the output of a block
of locations, ``(L, F, N)``, is already the next layer's batch-last input. Inputs and outputs
are ``(N, C, H, W)`` tensors; outputs are views of the batch-last buffer (no copy), which a
following locally connected layer reads without a copy.

Filter values are in (kh, kw, C) order, the (height, width, channels) order of terabrain's
image patches and filter pictures.

Memory: the patches of the whole input (``L K N`` values: 16x the input for 16x16 fields at
stride 4) are never all held, nor saved for the backward pass. Locations are processed in
blocks of output rows whose patches fit ``block_bytes``; the backward pass cuts each
block's patches again from the saved input. That costs one more copy of the patches and
saves ``L K N`` values per layer for the backward pass — what lets a seed-000 layer (192
images, 72 x 72 fields of 768 values: 3 GB of patches) train at all.

``transpose`` is the adjoint map (reconstruction ``W^T h`` for RICA and the decoder of an
untied autoencoder): every location's ``(K, F) @ (F, N)`` product is added back into the
input pixels of its field; overlapping fields sum.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from terabrain.nn.autoencoder import UnitInitialized, _draw_seed
from terabrain.nn.init import init_by_unit_
from terabrain.nn.unit_rows import normalize_rows_

DEFAULT_BLOCK_BYTES = None  # per device and thread count: see block_bytes_for


def block_bytes_for(device: torch.device, block_bytes: Optional[int]) -> int:
    """Patch bytes per block of locations. One CPU thread: 4 MiB, which stays in cache
    from the copy to the GEMM. Several threads: 32 MiB, since every copy, GEMM and add of
    a block is a parallel region that waits for its slowest thread, and on a busy machine
    (measured here: 2 threads, other load) small blocks were 3x slower than large ones.
    CUDA: 256 MiB, fewer and larger kernels. Memory stays bounded either way."""
    if block_bytes is not None:
        return block_bytes
    if device.type == "cuda":
        return 256 * 2**20
    return 4 * 2**20 if torch.get_num_threads() == 1 else 32 * 2**20


def output_length(size: int, kernel_size: int, stride: int) -> int:
    return (size - kernel_size) // stride + 1


def location_blocks(out_rows: int, out_width: int, location_bytes: int, block_bytes: int):
    """Blocks of locations whose patches take at most ``block_bytes`` (at least one
    location): ``(row, rows, col, cols)``, either whole rows or a run within one row, so
    each block is a contiguous range of (row-major) locations."""
    per_block = max(1, block_bytes // max(location_bytes, 1))
    if per_block >= out_width:
        step = min(out_rows, per_block // out_width)
        for row in range(0, out_rows, step):
            yield row, min(step, out_rows - row), 0, out_width
    else:
        for row in range(out_rows):
            for col in range(0, out_width, per_block):
                yield row, 1, col, min(per_block, out_width - col)


def batch_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (H, W, C, N): the layout the layer computes in. Free when
    ``x`` is already a view of such a buffer (the output of another locally connected
    layer)."""
    return x.permute(2, 3, 1, 0).contiguous()


def batch_first(x: torch.Tensor) -> torch.Tensor:
    """(H, W, C, N) -> an (N, C, H, W) view, no copy."""
    return x.permute(3, 2, 0, 1)


def cut_patches(x: torch.Tensor, kernel_size: int, stride: int, row: int, rows: int, col: int,
                cols: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The receptive fields of the locations in output rows ``row .. row + rows`` and
    columns ``col .. col + cols`` of ``x`` (H, W, C, N) as one ``(rows * cols, k k C, N)``
    tensor (into ``out`` if given): per location, the ``(K, N)`` operand of its GEMM,
    values in (kh, kw, C) order.

    Batch-last is what makes this copy cheap: one kernel row of one field is ``k C N``
    consecutive values, so the copy moves long contiguous runs, where the (N, C, H, W)
    layout would move runs of ``k`` values."""
    width, channels, n = x.shape[1:]
    k, s = kernel_size, stride
    pixel = channels * n
    fields = x.as_strided(
        (rows, cols, k, k * pixel),
        (s * width * pixel, s * pixel, width * pixel, 1),
        x.storage_offset() + (row * s * width + col * s) * pixel,
    )
    shape = (rows * cols, k * k * channels, n)
    if out is None:
        return fields.reshape(shape)
    out = out.view(shape)
    out.view(rows, cols, k, k * pixel).copy_(fields)
    return out


def add_patches_(out: torch.Tensor, patches: torch.Tensor, kernel_size: int, stride: int,
                 row: int, rows: int, col: int, cols: int) -> None:
    """The adjoint of ``cut_patches``: add each location's ``(K, N)`` patch values into the
    pixels of its field in ``out`` (H, W, C, N), overlaps summed.

    Kernel offsets are taken in tiles of ``stride x stride``; within one tile the fields of
    all locations cover disjoint pixels, so each tile is one strided in-place add
    (``ceil(k/s)^2`` adds, not ``k^2`` nor one per location)."""
    width, channels, n = out.shape[1:]
    k, s = kernel_size, stride
    row_stride, pixel = width * channels * n, channels * n
    values = patches.view(rows, cols, k, k, channels, n)
    for i in range(0, k, s):
        tile_h = min(s, k - i)
        for j in range(0, k, s):
            tile_w = min(s, k - j)
            target = out.as_strided(
                (rows, tile_h, cols, tile_w, channels, n),
                (s * row_stride, row_stride, s * pixel, pixel, n, 1),
                out.storage_offset() + (row * s + i) * row_stride + (col * s + j) * pixel,
            )
            target.add_(values[:, :, i:i + tile_h, j:j + tile_w].permute(0, 2, 1, 3, 4, 5))


def _blocks(x_or_y: torch.Tensor, weight: torch.Tensor, out_rows: int, out_width: int,
            batch: int, block_bytes: Optional[int]):
    """(locations slice, row, rows, col, cols) per block, and one reusable patch buffer: big
    fresh buffers cost page faults on every call, and small blocks stay in cache between
    the copy and the GEMM."""
    location_bytes = weight.shape[2] * batch * x_or_y.element_size()
    block_bytes = block_bytes_for(x_or_y.device, block_bytes)
    blocks = list(location_blocks(out_rows, out_width, location_bytes, block_bytes))
    largest = max(rows * cols for _, rows, _, cols in blocks)
    buffer = x_or_y.new_empty(largest * weight.shape[2] * batch)
    return [(slice(row * out_width + col, row * out_width + col + rows * cols), row, rows, col, cols)
            for row, rows, col, cols in blocks], buffer


def _apply(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
           out_rows: int, out_width: int, block_bytes: Optional[int]) -> torch.Tensor:
    """y[l, f, n] = sum_k W[l, f, k] patch_l(x)[k, n]: (H, W, C, N) -> (Ho, Wo, F, N)."""
    n, maps = x.shape[3], weight.shape[1]
    out = torch.empty(out_rows * out_width, maps, n, dtype=x.dtype, device=x.device)
    blocks, buffer = _blocks(x, weight, out_rows, out_width, n, block_bytes)
    for locations, row, rows, col, cols in blocks:
        patches = cut_patches(x, kernel_size, stride, row, rows, col, cols,
                              buffer[: (locations.stop - locations.start) * weight.shape[2] * n])
        torch.bmm(weight[locations], patches, out=out[locations])
    return out.view(out_rows, out_width, maps, n)


def _apply_transpose(y: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                     input_size: tuple[int, int], block_bytes: Optional[int]) -> torch.Tensor:
    """x[field_l, :, n] += sum_f W[l, f, :] y[l, f, n]: (Ho, Wo, F, N) -> (H, W, C, N), the
    adjoint of ``_apply``."""
    out_rows, out_width, maps, n = y.shape
    channels = weight.shape[2] // (kernel_size * kernel_size)
    x = torch.zeros(*input_size, channels, n, dtype=y.dtype, device=y.device)
    codes = y.view(out_rows * out_width, maps, n)
    blocks, buffer = _blocks(y, weight, out_rows, out_width, n, block_bytes)
    for locations, row, rows, col, cols in blocks:
        count = locations.stop - locations.start
        patches = buffer[: count * weight.shape[2] * n].view(count, weight.shape[2], n)
        torch.bmm(weight[locations].transpose(1, 2), codes[locations], out=patches)
        add_patches_(x, patches, kernel_size, stride, row, rows, col, cols)
    return x


def _weight_gradient(x: torch.Tensor, y: torch.Tensor, kernel_size: int, stride: int,
                     block_bytes: Optional[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """dW[l] = y_l patch_l(x)^T for the bilinear map y = W x: (L, F, K), from x (H, W, C, N)
    and y (Ho, Wo, F, N). With ``out``, added into it block by block (``baddbmm_``), so a
    weight used twice has one gradient buffer (terabrain.nn.shared_weight)."""
    out_rows, out_width, maps, n = y.shape
    k_total = x.shape[2] * kernel_size * kernel_size
    codes = y.reshape(out_rows * out_width, maps, n)
    grad = out if out is not None else torch.empty(
        out_rows * out_width, maps, k_total, dtype=x.dtype, device=x.device)
    blocks, buffer = _blocks(x, grad, out_rows, out_width, n, block_bytes)
    for locations, row, rows, col, cols in blocks:
        patches = cut_patches(x, kernel_size, stride, row, rows, col, cols,
                              buffer[: (locations.stop - locations.start) * k_total * n])
        if out is None:
            torch.bmm(codes[locations], patches.transpose(1, 2), out=grad[locations])
        else:
            grad[locations].baddbmm_(codes[locations], patches.transpose(1, 2))
    return grad


def _check_input(x: torch.Tensor, kernel_size: int, stride: int, out_rows: int, out_width: int):
    if x.dim() != 4:
        raise ValueError(f"locally connected layer: expected input (N, C, H, W), got {tuple(x.shape)}")
    height, width = x.shape[2:]
    if (output_length(height, kernel_size, stride), output_length(width, kernel_size, stride)) != (
            out_rows, out_width):
        raise ValueError(
            f"locally connected layer: input {height}x{width} gives "
            f"{output_length(height, kernel_size, stride)}x{output_length(width, kernel_size, stride)}"
            f" locations with kernel {kernel_size} and stride {stride}; the weights hold "
            f"{out_rows}x{out_width}")


class _LocalForward(torch.autograd.Function):
    """y = A(W) x with A cutting patches; saves x (batch-last) and W, not the patches."""

    @staticmethod
    def forward(ctx, x, weight, kernel_size, stride, out_rows, out_width, block_bytes):
        x = batch_last(x)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (kernel_size, stride, block_bytes)
        return batch_first(_apply(x, weight, kernel_size, stride, out_rows, out_width, block_bytes))

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        kernel_size, stride, block_bytes = ctx.geometry
        grad_y = batch_last(grad_y)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = batch_first(_apply_transpose(grad_y, weight, kernel_size, stride,
                                                  tuple(x.shape[:2]), block_bytes))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(x, grad_y, kernel_size, stride, block_bytes)
        return grad_x, grad_w, None, None, None, None, None


class _LocalTranspose(torch.autograd.Function):
    """x = A(W)^T y; its backward is the forward map and the same weight gradient."""

    @staticmethod
    def forward(ctx, y, weight, kernel_size, stride, input_size, block_bytes):
        y = batch_last(y)
        ctx.save_for_backward(y, weight)
        ctx.geometry = (kernel_size, stride, block_bytes)
        return batch_first(_apply_transpose(y, weight, kernel_size, stride, input_size,
                                            block_bytes))

    @staticmethod
    def backward(ctx, grad_x):
        y, weight = ctx.saved_tensors
        kernel_size, stride, block_bytes = ctx.geometry
        grad_x = batch_last(grad_x)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = batch_first(_apply(grad_x, weight, kernel_size, stride, y.shape[0],
                                        y.shape[1], block_bytes))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(grad_x, y, kernel_size, stride, block_bytes)
        return grad_y, grad_w, None, None, None, None


def locally_connected(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                      out_size: tuple[int, int],
                      block_bytes: Optional[int] = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """(N, C, H, W) -> (N, F, Ho, Wo) with ``weight`` (Ho*Wo, F, k k C); no bias."""
    _check_input(x, kernel_size, stride, *out_size)
    if x.shape[1] * kernel_size * kernel_size != weight.shape[2]:
        raise ValueError(f"locally connected layer: {x.shape[1]} input channels, but the "
                         f"filters hold {weight.shape[2] // (kernel_size * kernel_size)}")
    return _LocalForward.apply(x, weight, kernel_size, stride, out_size[0], out_size[1],
                               block_bytes)


def locally_connected_transpose(y: torch.Tensor, weight: torch.Tensor, kernel_size: int,
                                stride: int, input_size: tuple[int, int],
                                block_bytes: Optional[int] = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """The adjoint of ``locally_connected``: (N, F, Ho, Wo) -> (N, C, H, W)."""
    if y.dim() != 4 or y.shape[1] != weight.shape[1] or y.shape[2] * y.shape[3] != weight.shape[0]:
        raise ValueError(f"locally connected transpose: expected (N, {weight.shape[1]}, Ho, Wo) "
                         f"with Ho*Wo = {weight.shape[0]}, got {tuple(y.shape)}")
    return _LocalTranspose.apply(y, weight, kernel_size, stride, tuple(input_size), block_bytes)


class LocallyConnected2d(UnitInitialized):
    """Untied local receptive fields: ``out_channels`` units at each of ``Ho x Wo``
    locations, each unit with its own ``in_channels x k x k`` filter.

    ``weight`` is ``(Ho*Wo, out_channels, k*k*in_channels)``: one row per hidden unit,
    locations in row-major order, values in (kh, kw, C) order. Initialisation follows terabrain.nn.init by hidden unit
    (unit ``l * out_channels + f``), uniform in ``±1/sqrt(C k k)`` as nn.Linear; so the
    locations of a block of output rows, initialised alone (``init_parameter_`` with
    ``first_unit`` = its first location), equal those rows of the whole layer. The bias
    (``(out_channels, Ho, Wo)``) starts at zero.
    """

    # The dimension of each parameter along which a spatial plan splits it by output rows
    # (locations are row-major, so a block of rows is a contiguous range of weight rows).
    row_dims = {"weight": 0, "bias": 1}

    def __init__(self, in_channels: int, out_channels: int, input_size: tuple[int, int],
                 kernel_size: int, stride: int = 1, bias: bool = False,
                 seed: Optional[int] = None, block_bytes: Optional[int] = DEFAULT_BLOCK_BYTES):
        super().__init__()
        height, width = input_size
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be positive, got {kernel_size}, {stride}")
        if kernel_size > min(height, width):
            raise ValueError(f"kernel_size {kernel_size} is larger than the input {height}x{width}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size = (height, width)
        self.kernel_size, self.stride = kernel_size, stride
        self.output_size = (output_length(height, kernel_size, stride),
                            output_length(width, kernel_size, stride))
        self.block_bytes = block_bytes
        self.init_seed = _draw_seed(seed)
        locations = self.output_size[0] * self.output_size[1]
        fan_in = in_channels * kernel_size * kernel_size
        self.bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(locations, out_channels, fan_in))
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        """``first_unit``: the first location ``tensor`` holds (row-major)."""
        if name == "weight":
            # Units are (location, map) pairs: flatten so a block of locations is a
            # contiguous range of units, wherever it is initialised.
            units = tensor.view(-1, tensor.shape[-1])
            init_by_unit_(units, 0, first_unit * tensor.shape[1], self.init_seed, 4, "uniform",
                          self.bound)
        else:
            tensor.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.input_size):
            raise ValueError(f"LocallyConnected2d: expected input (N, {self.in_channels}, "
                             f"{self.input_size[0]}, {self.input_size[1]}), got {tuple(x.shape)}")
        y = locally_connected(x, self.weight, self.kernel_size, self.stride, self.output_size,
                              self.block_bytes)
        return y if self.bias is None else y + self.bias

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        return locally_connected_transpose(y, self.weight, self.kernel_size, self.stride,
                                           self.input_size, self.block_bytes)

    @torch.no_grad()
    def normalize_(self) -> None:
        normalize_rows_(self.weight)

    def filters(self) -> torch.Tensor:
        """One row per hidden unit (location-major), ``k * k * in_channels`` values each in
        (kh, kw, C) order, as terabrain.analysis.filters draws them."""
        return self.weight.detach().reshape(-1, self.weight.shape[-1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"output_size={self.output_size}, bias={self.bias is not None}")
