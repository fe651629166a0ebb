"""L2 pooling (Le et al. 2012): each output is the square root of the sum of squares of one
channel over a spatial window, an energy that is invariant to small shifts and phase of the
features pooled, as complex cells are.

``torch.nn.LPPool2d(2, ...)`` computes the same value but its gradient is NaN where the
window is all zeros (sqrt at 0), which ReLU-like or LCN'd features hit; the small ``eps``
inside the root keeps it finite. Max and average pooling come from PyTorch
(``nn.MaxPool2d``, ``nn.AvgPool2d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def l2_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0,
              eps: float = 1e-8) -> torch.Tensor:
    """``sqrt(eps + sum over the window of x^2)`` per channel; zero padding adds nothing."""
    kernel = nn.modules.utils._pair(kernel_size)
    stride = kernel if stride is None else nn.modules.utils._pair(stride)
    area = kernel[0] * kernel[1]
    sums = F.avg_pool2d(x * x, kernel, stride, padding, count_include_pad=True) * area
    return (sums + eps).sqrt()


class L2Pool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0, eps: float = 1e-8):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.eps = kernel_size, stride, padding, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_pool2d(x, self.kernel_size, self.stride, self.padding, self.eps)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
