"""The untied locally connected layer of seeds 000 and 003: every output location has its own
filters over its own k x k receptive field (no weight sharing, no padding).

How it is computed (seed 003, "small dense multiplies"): the ``out_channels`` units at one
location share a receptive field, so a location is one dense GEMM ``(N, K) @ (K, F)`` with
``K = C k k``, and all locations are one batched GEMM ``(L, N, K) @ (L, K, F)``. The
patches are cut from the input with one strided view and one copy (no ``F.unfold`` plus
permute: that is two copies). Neither a loop over locations in Python nor a dense masked
``(C H W) x (F L)`` matrix, which would be mostly zeros.

Memory: the patches of the whole input (``N L K`` values: 16x the input for 16x16 fields at
stride 4) are never all held, nor saved for the backward pass. Locations are processed in
blocks of output rows whose patches fit ``block_bytes``; the backward pass cuts each
block's patches again from the saved input. That costs one more copy of the patches and
saves ``N L K`` values per layer for the backward pass — what lets a seed-000 layer (192
images, 72 x 72 fields of 768 values: 3 GB of patches) train at all.

``transpose`` is the adjoint map (reconstruction ``W^T h`` for RICA and the decoder of an
untied autoencoder): every location's ``(N, F) @ (F, K)`` product is added back into the
input pixels of its field. Overlapping fields sum. The adjoint of cutting patches is
scattering them back, done as ``ceil(k/s)^2`` additions of non-overlapping tiles instead of
``k^2`` (or one per location).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from terabrain.nn.autoencoder import UnitInitialized, _draw_seed
from terabrain.nn.init import init_by_unit_

DEFAULT_BLOCK_BYTES = 32 * 2**20  # per block of patches; small enough to stay in cache-ish


def output_length(size: int, kernel_size: int, stride: int) -> int:
    return (size - kernel_size) // stride + 1


def _rows_per_block(rows: int, per_row_bytes: int, block_bytes: int) -> int:
    return max(1, min(rows, block_bytes // max(per_row_bytes, 1)))


def cut_patches(x: torch.Tensor, kernel_size: int, stride: int, first_row: int, rows: int,
                out_width: int) -> torch.Tensor:
    """The receptive fields of output rows ``first_row .. first_row + rows`` as one
    ``(rows * out_width, N, C k k)`` tensor (location-major, patch values in (C, kh, kw)
    order, as ``F.unfold``)."""
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.stride()
    k, s = kernel_size, stride
    fields = x.as_strided(
        (rows, out_width, n, c, k, k),
        (s * sh, s * sw, sn, sc, sh, sw),
        x.storage_offset() + first_row * s * sh,
    )
    return fields.reshape(rows * out_width, n, c * k * k)


def add_patches_(out: torch.Tensor, patches: torch.Tensor, kernel_size: int, stride: int,
                 first_row: int, rows: int, out_width: int) -> None:
    """The adjoint of ``cut_patches``: add each location's patch values into the pixels of
    its field in ``out`` (N, C, H, W), overlaps summed.

    Kernel offsets are taken in tiles of ``stride x stride``; within one tile the fields of
    all locations cover disjoint pixels, so each tile is a single strided in-place add."""
    n, c = out.shape[:2]
    sn, sc, sh, sw = out.stride()
    k, s = kernel_size, stride
    values = patches.view(rows, out_width, n, c, k, k).permute(2, 3, 0, 4, 1, 5)
    for i in range(0, k, s):
        tile_h = min(s, k - i)
        for j in range(0, k, s):
            tile_w = min(s, k - j)
            target = out.as_strided(
                (n, c, rows, tile_h, out_width, tile_w),
                (sn, sc, s * sh, sh, s * sw, sw),
                out.storage_offset() + (first_row * s + i) * sh + j * sw,
            )
            target.add_(values[:, :, :, i:i + tile_h, :, j:j + tile_w])


def _locations_to_image(values: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(L, N, F) -> (N, F, rows, width)."""
    return values.view(rows, width, *values.shape[1:]).permute(2, 3, 0, 1)


def _image_to_locations(values: torch.Tensor) -> torch.Tensor:
    """(N, F, rows, width) -> contiguous (L, N, F)."""
    n, f, rows, width = values.shape
    return values.permute(2, 3, 0, 1).reshape(rows * width, n, f)


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


def _apply(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
           out_rows: int, out_width: int, block_bytes: int) -> torch.Tensor:
    """y[n, f, l] = sum_k W[l, f, k] patch_l(x)[n, k], as (N, F, out_rows, out_width)."""
    n, k_total = x.shape[0], weight.shape[2]
    out = torch.empty(out_rows * out_width, n, weight.shape[1], dtype=x.dtype, device=x.device)
    step = _rows_per_block(out_rows, out_width * n * k_total * x.element_size(), block_bytes)
    for row in range(0, out_rows, step):
        rows = min(step, out_rows - row)
        block = slice(row * out_width, (row + rows) * out_width)
        patches = cut_patches(x, kernel_size, stride, row, rows, out_width)
        torch.bmm(patches, weight[block].transpose(1, 2), out=out[block])
    return _locations_to_image(out, out_rows, out_width)


def _apply_transpose(y: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                     input_size: tuple[int, int], block_bytes: int) -> torch.Tensor:
    """x[n, :, field_l] += sum_f y[n, f, l] W[l, f, :]: the adjoint of ``_apply``."""
    n, _, out_rows, out_width = y.shape
    channels = weight.shape[2] // (kernel_size * kernel_size)
    x = torch.zeros(n, channels, *input_size, dtype=y.dtype, device=y.device)
    codes = _image_to_locations(y)
    step = _rows_per_block(out_rows, out_width * n * weight.shape[2] * y.element_size(), block_bytes)
    for row in range(0, out_rows, step):
        rows = min(step, out_rows - row)
        block = slice(row * out_width, (row + rows) * out_width)
        patches = torch.bmm(codes[block], weight[block])
        add_patches_(x, patches, kernel_size, stride, row, rows, out_width)
    return x


def _weight_gradient(x: torch.Tensor, y: torch.Tensor, kernel_size: int, stride: int,
                     block_bytes: int) -> torch.Tensor:
    """dW[l] = y_l^T patch_l(x) for the bilinear map y = W x: (L, F, K)."""
    n, f, out_rows, out_width = y.shape
    k_total = x.shape[1] * kernel_size * kernel_size
    codes = _image_to_locations(y)
    grad = torch.empty(out_rows * out_width, f, k_total, dtype=x.dtype, device=x.device)
    step = _rows_per_block(out_rows, out_width * n * k_total * x.element_size(), block_bytes)
    for row in range(0, out_rows, step):
        rows = min(step, out_rows - row)
        block = slice(row * out_width, (row + rows) * out_width)
        patches = cut_patches(x, kernel_size, stride, row, rows, out_width)
        torch.bmm(codes[block].transpose(1, 2), patches, out=grad[block])
    return grad


class _LocalForward(torch.autograd.Function):
    """y = A(W) x with A cutting patches; saves x and W only (patches are cut again)."""

    @staticmethod
    def forward(ctx, x, weight, kernel_size, stride, out_rows, out_width, block_bytes):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.geometry = (kernel_size, stride, block_bytes)
        return _apply(x, weight, kernel_size, stride, out_rows, out_width, block_bytes)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        kernel_size, stride, block_bytes = ctx.geometry
        grad_y = grad_y.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _apply_transpose(grad_y, weight, kernel_size, stride, tuple(x.shape[2:]),
                                      block_bytes)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(x, grad_y, kernel_size, stride, block_bytes)
        return grad_x, grad_w, None, None, None, None, None


class _LocalTranspose(torch.autograd.Function):
    """x = A(W)^T y; its backward is the forward map and the same weight gradient."""

    @staticmethod
    def forward(ctx, y, weight, kernel_size, stride, input_size, block_bytes):
        y = y.contiguous()
        ctx.save_for_backward(y, weight)
        ctx.geometry = (kernel_size, stride, block_bytes)
        return _apply_transpose(y, weight, kernel_size, stride, input_size, block_bytes)

    @staticmethod
    def backward(ctx, grad_x):
        y, weight = ctx.saved_tensors
        kernel_size, stride, block_bytes = ctx.geometry
        grad_x = grad_x.contiguous()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = _apply(grad_x, weight, kernel_size, stride, y.shape[2], y.shape[3],
                            block_bytes)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_gradient(grad_x, y, kernel_size, stride, block_bytes)
        return grad_y, grad_w, None, None, None, None


def locally_connected(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int,
                      out_size: tuple[int, int],
                      block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """(N, C, H, W) -> (N, F, Ho, Wo) with ``weight`` (Ho*Wo, F, C k k); no bias."""
    _check_input(x, kernel_size, stride, *out_size)
    return _LocalForward.apply(x, weight, kernel_size, stride, out_size[0], out_size[1],
                               block_bytes)


def locally_connected_transpose(y: torch.Tensor, weight: torch.Tensor, kernel_size: int,
                                stride: int, input_size: tuple[int, int],
                                block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """The adjoint of ``locally_connected``: (N, F, Ho, Wo) -> (N, C, H, W)."""
    if y.dim() != 4 or y.shape[1] != weight.shape[1] or y.shape[2] * y.shape[3] != weight.shape[0]:
        raise ValueError(f"locally connected transpose: expected (N, {weight.shape[1]}, Ho, Wo) "
                         f"with Ho*Wo = {weight.shape[0]}, got {tuple(y.shape)}")
    return _LocalTranspose.apply(y, weight, kernel_size, stride, tuple(input_size), block_bytes)


class LocallyConnected2d(UnitInitialized):
    """Untied local receptive fields: ``out_channels`` units at each of ``Ho x Wo``
    locations, each unit with its own ``in_channels x k x k`` filter.

    ``weight`` is ``(Ho*Wo, out_channels, in_channels*k*k)``: one row per hidden unit,
    locations in row-major order. Initialisation follows terabrain.nn.init by hidden unit
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
                 seed: Optional[int] = None, block_bytes: int = DEFAULT_BLOCK_BYTES):
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
        self.weight.div_(self.weight.norm(dim=2, keepdim=True).clamp_min(1e-12))

    def filters(self) -> torch.Tensor:
        """One row per hidden unit (location-major), ``in_channels * k * k`` values each."""
        return self.weight.detach().reshape(-1, self.weight.shape[-1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"output_size={self.output_size}, bias={self.bias is not None}")
