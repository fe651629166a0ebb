"""The linear maps of a deep network's layers, as the one-buffer autograd function
(terabrain.nn.shared_weight.unit_row_map_pair) needs them: ``apply`` (codes from an input,
``A(W) x``), ``adjoint`` (``A(W)^T y``), and ``weight_gradient`` (the gradient of
``<y, A(W) x>`` with respect to W, written into a fresh buffer or added into a given one).

Each map works in its own *native* layout, where it computes without copies: a locally
connected map batch-last ``(H, W, C, N)`` (terabrain.nn.local), conv ``(N, C, H, W)``,
dense ``(N, D)`` rows. ``native`` converts the (N, C, H, W) tensors layers exchange (inputs
and codes) to it, a copy only when needed; ``public_input`` and ``public_codes`` convert
back, as views.

Every map has one hidden unit per row of W (the last dimension is a filter); ``unit_scale``
lays out a per-unit factor (shape ``W.shape[:-1]``) so it multiplies the native codes, and
``unit_sum`` sums a native code-shaped tensor back to that shape (over the batch and, for
conv, over positions). That is how the row normalisation is applied to the codes instead
of forming W / |W|.

Geometry only: a map holds no weights, so the layers of one process and the row blocks of
a split layer (terabrain.parallel.spatial_network) use the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from terabrain.nn.local import (
    _apply,
    _apply_transpose,
    _weight_gradient,
    batch_first,
    batch_last,
    output_length,
)


class LocalMap:
    """Untied locally connected filters: W ``(Ho*Wo, F, k k C)``; codes ``(Ho, Wo, F, N)``
    natively. ``input_size`` is the (H, W) of the input this map reads (a split layer's
    block with its halo rows)."""

    def __init__(self, kernel_size: int, stride: int, input_size: tuple[int, int],
                 block_bytes: int | None = None):
        self.kernel_size, self.stride, self.block_bytes = kernel_size, stride, block_bytes
        self.input_size = tuple(input_size)
        self.output_size = tuple(output_length(n, kernel_size, stride) for n in input_size)

    def native(self, x: torch.Tensor) -> torch.Tensor:
        return batch_last(x)

    def public_codes(self, y: torch.Tensor) -> torch.Tensor:
        return batch_first(y)

    def public_input(self, x: torch.Tensor) -> torch.Tensor:
        return batch_first(x)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[:2]) != self.input_size:
            raise ValueError(f"locally connected layer: input {tuple(x.shape[:2])}, expected "
                             f"{self.input_size}")
        return _apply(x, weight, self.kernel_size, self.stride, *self.output_size,
                      self.block_bytes)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _apply_transpose(y, weight, self.kernel_size, self.stride, self.input_size,
                                self.block_bytes)

    def weight_gradient(self, x: torch.Tensor, y: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        return _weight_gradient(x, y, self.kernel_size, self.stride, self.block_bytes, out)

    def unit_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(*self.output_size, scale.shape[1], 1)

    def unit_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum(-1).view(-1, values.shape[2])


class ConvMap:
    """Filters shared over positions: W ``(maps, k k C)`` in (kh, kw, C) order (the local
    layer's and the pictures' order); torch's conv2d and its adjoint."""

    def __init__(self, kernel_size: int, stride: int, in_shape: tuple[int, int, int]):
        self.kernel_size, self.stride, self.in_shape = kernel_size, stride, tuple(in_shape)
        self.output_size = tuple(output_length(n, kernel_size, stride) for n in in_shape[1:])

    def native(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def public_codes(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def public_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _kernel(self, weight: torch.Tensor) -> torch.Tensor:
        k, channels = self.kernel_size, self.in_shape[0]
        return weight.view(weight.shape[0], k, k, channels).permute(0, 3, 1, 2)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._kernel(weight), stride=self.stride)

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _, height, width = self.in_shape
        used = [(n - 1) * self.stride + self.kernel_size for n in self.output_size]
        return F.conv_transpose2d(y, self._kernel(weight), stride=self.stride,
                                  output_padding=(height - used[0], width - used[1]))

    def weight_gradient(self, x: torch.Tensor, y: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        # The kernel's gradient is the size of the filters, which conv shares over every
        # position: small, so its transient (C, k, k) -> (k, k, C) reorder costs nothing.
        maps, (channels, k) = y.shape[1], (self.in_shape[0], self.kernel_size)
        grad = torch.nn.grad.conv2d_weight(x, (maps, channels, k, k), y, stride=self.stride)
        grad = grad.permute(0, 2, 3, 1).reshape(maps, -1)
        return grad if out is None else out.add_(grad)

    def unit_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(1, -1, 1, 1)

    def unit_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum((0, 2, 3))


class DenseMap:
    """Fully connected on the flattened input: W ``(units, C H W)``; codes ``(N, units)``
    natively, ``(N, units, 1, 1)`` publicly."""

    def __init__(self, in_shape: tuple[int, int, int]):
        self.in_shape = tuple(in_shape)

    def native(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def public_codes(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, :, None, None]

    def public_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, *self.in_shape)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight.t()

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return y @ weight

    def weight_gradient(self, x: torch.Tensor, y: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        return y.t() @ x if out is None else out.addmm_(y.t(), x)

    def unit_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale

    def unit_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum(0)
