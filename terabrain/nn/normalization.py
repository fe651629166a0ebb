"""Local contrast normalization (Jarrett et al. 2009; after every layer in Ni et al. 2015 and in
Le et al. 2012): subtract a Gaussian-weighted local mean taken across all channels, then
divide by the Gaussian-weighted local standard deviation, never by less than its mean over
the image (so flat regions are not blown up to unit contrast).

Borders: the window is cut at the image edge and renormalised over the pixels inside (the
local mean of a constant image is that constant everywhere), instead of zero padding,
which would pull the mean towards 0 near edges and leave bright borders after subtraction.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_window(kernel_size: int, sigma: float, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """The 1-D Gaussian (odd ``kernel_size`` taps, sum 1); the 2-D window is its outer
    product with itself."""
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = torch.exp(-offsets**2 / (2 * sigma**2))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _local_average(maps: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Gaussian average of (N, 1, H, W) maps over the window inside the image (separable)."""
    pad = len(taps) // 2
    rows, cols = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)

    def blur(m):
        return F.conv2d(F.conv2d(m, rows, padding=(pad, 0)), cols, padding=(0, pad))

    inside = blur(torch.ones_like(maps[:1]))
    return blur(maps) / inside


def local_contrast_normalize(x: torch.Tensor, kernel_size: int = 9,
                             sigma: Optional[float] = None, eps: float = 1e-6) -> torch.Tensor:
    """Subtractive then divisive normalization of ``x`` (N, C, H, W) or one image (C, H, W).

    ``v = x - G * x`` and ``y = v / max(s, mean(s), eps)`` with ``s = sqrt(G * v^2)``, where
    ``G *`` is the Gaussian window (``kernel_size`` taps, standard deviation ``sigma``,
    default ``kernel_size / 4``) summed across channels, i.e. applied to the channel mean.
    ``mean(s)`` is taken per image over all positions."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"local contrast normalization: kernel_size must be odd and positive, "
                         f"got {kernel_size}")
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"local contrast normalization: expected (N, C, H, W) or (C, H, W), "
                         f"got {tuple(x.shape)}")
    taps = gaussian_window(kernel_size, window_sigma(kernel_size, sigma), x.dtype, x.device)
    centred, spread = centre_and_spread(x, taps)
    y = divide(centred, spread, spread.mean(dim=(2, 3), keepdim=True), eps)
    return y.squeeze(0) if single else y


def window_sigma(kernel_size: int, sigma: Optional[float]) -> float:
    sigma = kernel_size / 4 if sigma is None else sigma
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"local contrast normalization: sigma must be positive, got {sigma}")
    return sigma


def centre_and_spread(x: torch.Tensor, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two local steps: ``v = x - G * x`` and ``s = sqrt(G * v^2)``. Where ``x`` is a
    band of rows of a larger map, ``v`` is exact ``r = len(taps) // 2`` rows in from a cut
    that is not the map's edge, and ``s`` ``2 r`` rows in (what spatial parallelism uses)."""
    centred = x - _local_average(x.mean(dim=1, keepdim=True), taps)
    spread = _local_average(centred.pow(2).mean(dim=1, keepdim=True), taps).clamp_min(0).sqrt()
    return centred, spread


def divide(centred: torch.Tensor, spread: torch.Tensor, mean_spread: torch.Tensor,
           eps: float) -> torch.Tensor:
    """The divisive step: ``v / max(s, mean(s), eps)``."""
    return centred / torch.maximum(spread, mean_spread.clamp_min(eps))


class LocalContrastNorm(nn.Module):
    """``local_contrast_normalize`` as a layer (no parameters); also a data transform on
    single (C, H, W) images."""

    def __init__(self, kernel_size: int = 9, sigma: Optional[float] = None, eps: float = 1e-6):
        super().__init__()
        self.kernel_size, self.sigma, self.eps = kernel_size, sigma, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_contrast_normalize(x, self.kernel_size, self.sigma, self.eps)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, eps={self.eps}"
