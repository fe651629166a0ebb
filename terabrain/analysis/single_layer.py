"""The single-layer feature extraction of Coates, Lee & Ng 2011 ("An analysis of
single-layer networks in unsupervised feature learning"), with a run's own preprocessing:

1. every w x w patch of an image (stride 1) gets the run's per-patch mean removal and ZCA;
2. an encoder maps each whitened patch to K values, followed by a nonlinearity;
3. the K maps are sum-pooled over the image's four quadrants: 4K features per image.

Steps 1 and 2 are a convolution: mean removal and ZCA are one linear map of the patch,
so the whitened patches at every position are ``conv2d(image, E) + b`` with E = the map's
D x D matrix as D filters of w x w (``WhitenedPatches``). The encoder then runs on rows of
D values (any learner's ``encode``), a batch of images at a time, so memory stays bounded
by ``images_per_batch x positions x K``. Features are written to a float16 memory map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from terabrain.data.whitening import ZCA
from terabrain.errors import ConfigError

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""Rows of whitened patches (N, D) -> features (N, K)."""

NONLINEARITIES = ("abs", "relu", "none")


def nonlinearity(name: str, inplace: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder's nonlinearity at extraction. RICA's codes are linear in the patch, and
    pooled linear codes are a linear function of the pixels, so some nonlinearity is needed.
    ``relu`` (the default) keeps the sign that ``abs`` (RICA's |Wx| penalty) discards: on
    Fashion-MNIST's validation split it was 1.6 points better for RICA, 0.9 for random
    filters (docs/analysis.md). For non-negative codes (triangle, sigmoid) both change nothing."""
    if name == "abs":
        return torch.abs_ if inplace else torch.abs
    if name == "relu":
        return torch.relu_ if inplace else torch.relu
    if name == "none":
        return lambda x: x
    raise ConfigError(f"--nonlinearity {name!r}; allowed: {', '.join(NONLINEARITIES)}")


def affine_form(encoder: Encoder, dims: int, seed: int = 0
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(A, c)`` with ``encoder(x) == x @ A + c`` (A: D x K) when the encoder is affine,
    read off its outputs at 0 and at the D unit vectors and checked on random rows; None
    otherwise. RICA's codes and a linear autoencoder's pre-activations are affine: they then
    run as one matrix product instead of the module's several passes over the (rows, K) codes
    (its row-norm scaling, alpha), which at every position of every image cost more than the
    product itself."""
    with torch.no_grad():
        offset = encoder(torch.zeros(1, dims))[0].float()
        matrix = encoder(torch.eye(dims)).float() - offset
        rows = torch.randn(16, dims, generator=torch.Generator().manual_seed(seed))
        expected = encoder(rows).float()
        got = torch.addmm(offset, rows, matrix)
    scale = expected.abs().max().clamp_min(1e-12)
    if expected.shape != got.shape or (expected - got).abs().max() > 1e-4 * scale:
        return None
    return matrix, offset


def affine_encoder(matrix: torch.Tensor, offset: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor]) -> Encoder:
    """rows -> activation(rows @ matrix + offset), the activation applied in place."""
    return lambda rows: activation(torch.addmm(offset, rows, matrix))


class WhitenedPatches:
    """Every w x w patch of grey images, preprocessed as the run's training patches were:
    ``((p - mean(p)) - zca.mean) @ zca.matrix`` when both are on; as a convolution."""

    def __init__(self, side: int, remove_mean: bool, whitening: Optional[ZCA]):
        self.side = side
        dims = side * side
        linear = torch.eye(dims, dtype=torch.float64)
        if remove_mean:  # p - mean(p) = (I - 11^T / D) p
            linear = linear - 1.0 / dims
        offset = torch.zeros(dims, dtype=torch.float64)
        if whitening is not None:
            matrix = torch.from_numpy(whitening.matrix).double()
            linear = linear @ matrix  # rows: x -> x @ linear (both maps act on rows)
            offset = -torch.from_numpy(whitening.mean).double() @ matrix
        # conv2d's output channel j = sum_i patch_i * linear[i, j]: filter j is column j.
        self.weight = linear.T.reshape(dims, 1, side, side).float().contiguous()
        self.bias = offset.float()
        self.dims = dims

    def positions(self, height: int, width: int) -> tuple[int, int]:
        return height - self.side + 1, width - self.side + 1

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, H', W', D) whitened patches, one per stride-1 position."""
        maps = F.conv2d(images[:, None].float(), self.weight, self.bias)
        return maps.permute(0, 2, 3, 1)

    def rows(self, patches: torch.Tensor) -> torch.Tensor:
        """Flattened patches (N, w*w), row-major as the run's training rows -> whitened rows:
        the same map applied patch by patch (the reference the convolution is tested on)."""
        weight = self.weight.reshape(self.dims, self.dims)  # [j, i] = linear[i, j]
        return patches.float() @ weight.T + self.bias


def quadrant_bounds(size: int) -> tuple[slice, slice]:
    """Coates et al.'s pooling halves of ``size`` positions: [0, ceil(size/2)) and the rest."""
    middle = (size + 1) // 2
    return slice(0, middle), slice(middle, size)


def quadrant_matrix(height: int, width: int) -> torch.Tensor:
    """(4, height * width): row q is 1 at the positions of quadrant q (top-left, top-right,
    bottom-left, bottom-right), 0 elsewhere."""
    rows, cols = quadrant_bounds(height), quadrant_bounds(width)
    matrix = torch.zeros(4, height, width)
    for q, (r, c) in enumerate((r, c) for r in rows for c in cols):
        matrix[q, r, c] = 1.0
    return matrix.reshape(4, height * width)


def quadrant_pool(maps: torch.Tensor) -> torch.Tensor:
    """(B, H', W', K) -> (B, 4K) float32: sums over the top-left, top-right, bottom-left and
    bottom-right quadrants of the positions, in that order (each block of K features).

    One (4 x positions) @ (positions x K) product per image: it reads the codes once, in
    their own type. Four strided slice sums cost 8x as much (measured on bfloat16 codes:
    0.18 vs 0.023 CPU s per 40 images at K = 1,600), more than the encoding itself. For
    bfloat16 codes the product accumulates in float32 and rounds each sum once (2^-9)."""
    b, h, w, k = maps.shape
    pooled = torch.matmul(quadrant_matrix(h, w).to(maps.dtype), maps.reshape(b, h * w, k))
    return pooled.reshape(b, 4 * k).float()


PRECISIONS = ("bf16", "fp32")


def pooled_features(images: torch.Tensor, patches: WhitenedPatches, encoder: Encoder,
                    precision: str = "fp32") -> torch.Tensor:
    """(B, H, W) images -> (B, 4K) sum-pooled encoder outputs at every position.

    ``precision="bf16"`` runs the encoder under CPU autocast: its matrix products (the
    whole cost: positions x D x K multiply-adds per image) in bfloat16 with float32
    accumulation, 3.4x the float32 rate measured for these thin (D = 36) products on
    avx512_bf16 cores; the per-code error is bfloat16's rounding (2^-9 relative) and the
    pooled sums stay float32. The whitening convolution (D outputs, not K) stays float32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    whitened = patches(images)
    b, h, w, d = whitened.shape
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        codes = encoder(whitened.reshape(b * h * w, d))
    return quadrant_pool(codes.reshape(b, h, w, -1))


def images_per_batch(positions: int, features: int, budget_bytes: int = 256 * 2**20) -> int:
    """How many images to encode at once so the (positions x K) codes stay within budget."""
    return max(1, budget_bytes // (4 * positions * max(features, 1)))


@torch.no_grad()
def extract(images: np.ndarray, patches: WhitenedPatches, encoder: Encoder, features: int,
            out: Optional[Path] = None, budget_bytes: int = 256 * 2**20,
            precision: str = "fp32") -> np.ndarray:
    """Pooled features of (N, H, W) images as an (N, 4K) float16 array: in memory, or a
    memory map at ``out`` (what a large set needs). Each quadrant's sum is divided by its
    number of positions before storing (a constant per feature, which the probe's
    standardisation removes) so that float16 does not overflow."""
    n, height, width = images.shape
    ph, pw = patches.positions(height, width)
    if ph < 1 or pw < 1:
        raise ConfigError(f"the run's {patches.side}x{patches.side} patches do not fit "
                          f"{height}x{width} images")
    rows, cols = quadrant_bounds(ph), quadrant_bounds(pw)
    counts = torch.tensor([len(range(ph)[r]) * len(range(pw)[c]) for r in rows for c in cols],
                          dtype=torch.float32).repeat_interleave(features)
    shape = (n, 4 * features)
    result = (np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=shape)
              if out is not None else np.empty(shape, np.float16))
    step = images_per_batch(ph * pw, features, budget_bytes)
    for start in range(0, n, step):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + step], np.float32))
        pooled = pooled_features(batch, patches, encoder, precision) / counts
        if not torch.isfinite(pooled).all() or pooled.abs().max() > 6e4:
            raise ValueError("features overflow float16 (|value| > 6e4)")
        result[start:start + len(batch)] = pooled.numpy().astype(np.float16)
    if isinstance(result, np.memmap):
        result.flush()
    return result


def random_unit_filters(features: int, dims: int, seed: int) -> torch.Tensor:
    """K random directions (Gaussian rows scaled to unit norm): the random-filter baseline."""
    filters = torch.randn(features, dims, generator=torch.Generator().manual_seed(seed))
    return filters / filters.norm(dim=1, keepdim=True)


def sample_whitened_patches(images: np.ndarray, patches: WhitenedPatches, count: int,
                            seed: int) -> torch.Tensor:
    """``count`` whitened patches at random images and positions (to train k-means on)."""
    rng = np.random.default_rng(seed)
    n, height, width = images.shape
    ph, pw = patches.positions(height, width)
    which, top, left = rng.integers(0, n, count), rng.integers(0, ph, count), rng.integers(0, pw, count)
    side = patches.side
    raw = np.stack([images[i, y:y + side, x:x + side].reshape(-1)
                    for i, y, x in zip(which, top, left)])
    return patches.rows(torch.from_numpy(raw.astype(np.float32)))

