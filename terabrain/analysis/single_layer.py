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

import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from terabrain.data.whitening import ZCA
from terabrain.errors import ConfigError

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""Rows of whitened patches (N, D) -> features (N, K)."""

NONLINEARITIES = ("abs", "relu", "none", "split")


def nonlinearity(name: str, inplace: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder's nonlinearity at extraction. RICA's codes are linear in the patch, and
    pooled linear codes are a linear function of the pixels, so some nonlinearity is needed.
    ``relu`` (the default) keeps the sign that ``abs`` (RICA's |Wx| penalty) discards: on
    Fashion-MNIST's validation split it was 1.6 points better for RICA, 0.9 for random
    filters (docs/analysis.md). For non-negative codes (triangle, sigmoid) both change nothing.
    ``split`` is not an element-wise function (it doubles the codes): see ``Encoding``."""
    if name == "abs":
        return torch.abs_ if inplace else torch.abs
    if name in ("relu", "split"):
        return torch.relu_ if inplace else torch.relu
    if name == "none":
        return lambda x: x
    raise ConfigError(f"--nonlinearity {name!r}; allowed: {', '.join(NONLINEARITIES)}")


@dataclass(frozen=True)
class Encoding:
    """The nonlinearity applied to a filter's code ``s`` at extraction, with a threshold
    ``t`` (Coates & Ng 2011, "The importance of encoding versus training"):

    - ``relu``: ``max(0, s - t)`` (t = 0: the plain rectifier; t > 0: one-sided soft threshold);
    - ``abs``: ``max(0, |s| - t)``;
    - ``split``: the polarity split ``max(0, s - t), max(0, -s - t)``: two features per filter,
      so K filters give 2K maps (8K pooled features); K stays the filter count;
    - ``none``: ``s`` (threshold must be 0).

    The same encoding is given to every filter set that has linear codes (the run's encoder
    and the random filters); k-means keeps its own triangle activation."""

    name: str = "relu"
    threshold: float = 0.0

    def __post_init__(self):
        nonlinearity(self.name)  # the name's check
        if self.threshold < 0 or (self.name == "none" and self.threshold != 0):
            raise ConfigError(f"--threshold {self.threshold:g}: must be >= 0, and 0 with "
                              "--nonlinearity none")

    @property
    def outputs_per_filter(self) -> int:
        return 2 if self.name == "split" else 1

    def affine(self, matrix: torch.Tensor, offset: torch.Tensor) -> Encoder:
        """The encoder ``rows -> encoding(rows @ matrix + offset)`` as one product: the split
        as the filters and their negatives, the threshold folded into the offset."""
        if self.name == "split":
            matrix, offset = torch.cat([matrix, -matrix], 1), torch.cat([offset, -offset])
        if self.name == "abs":
            return affine_encoder(matrix, offset, self)
        return affine_encoder(matrix.contiguous(), offset - self.threshold,
                              nonlinearity(self.name, inplace=True))

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """The encoding of (rows, K) codes -> (rows, K * outputs_per_filter), in place where
        it can be."""
        if self.name == "split":
            codes = torch.cat([codes, -codes], 1)
        elif self.name == "abs":
            codes = codes.abs_()
        if self.name == "none":
            return codes
        return codes.sub_(self.threshold).relu_() if self.threshold else codes.relu_()


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


class ThreadBuffers:
    """One reusable tensor per thread and (rows, columns, dtype): the encoder's (rows, K)
    codes are written into the same memory at every batch instead of a fresh allocation
    each time (a fresh mapping of tens of MB costs a page fault per 4 KB page: 122 million
    minor faults, 242 s of system time in one full-split evaluation before this)."""

    def __init__(self):
        self._local = threading.local()

    def get(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (rows, columns, dtype)
        if key not in buffers:
            buffers.clear()  # the last batch is smaller: keep one buffer per thread
            buffers[key] = torch.empty(rows, columns, dtype=dtype)
        return buffers[key]


class AffineEncoder:
    """rows -> activation(rows @ matrix + offset), the activation applied in place, written
    into this thread's reused buffer: the result is overwritten by the thread's next call.
    Under CPU autocast the product runs in the autocast type (bfloat16) with float32
    accumulation, as autocast's own addmm would (autocast does not apply to ``out=``)."""

    def __init__(self, matrix: torch.Tensor, offset: torch.Tensor,
                 activation: Callable[[torch.Tensor], torch.Tensor]):
        self.matrix, self.offset, self.activation = matrix.contiguous(), offset, activation
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffers = ThreadBuffers()

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                 else rows.dtype)
        if dtype not in self._cast:
            self._cast[dtype] = self.matrix.to(dtype), self.offset.to(dtype)
        matrix, offset = self._cast[dtype]
        codes = self._buffers.get(rows.shape[0], matrix.shape[1], dtype)
        with torch.autocast("cpu", enabled=False):
            torch.addmm(offset, rows.to(dtype), matrix, out=codes)
        return self.activation(codes)


def affine_encoder(matrix: torch.Tensor, offset: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor]) -> Encoder:
    """rows -> activation(rows @ matrix + offset), the activation applied in place."""
    return AffineEncoder(matrix, offset, activation)


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


def grid_bounds(size: int, cells: int = 2) -> list[slice]:
    """``size`` positions split into ``cells`` ranges, the earlier ones no shorter: cell i is
    [ceil(i size / cells), ceil((i + 1) size / cells)). For 2, Coates et al.'s pooling
    halves: [0, ceil(size/2)) and the rest."""
    edges = [-(-i * size // cells) for i in range(cells + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(cells)]


def quadrant_bounds(size: int) -> list[slice]:
    """The protocol's pooling halves (``grid_bounds(size, 2)``)."""
    return grid_bounds(size, 2)


@functools.lru_cache(maxsize=8)
def cell_order(height: int, width: int, cells: int = 2) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The row-major position indices of a height x width map grouped by grid cell (cells
    row-major: for 2, top-left, top-right, bottom-left, bottom-right), and where each cell's
    run starts in that order (with the end)."""
    index = torch.arange(height * width).reshape(height, width)
    runs = [index[r, c].reshape(-1) for r in grid_bounds(height, cells)
            for c in grid_bounds(width, cells)]
    edges = [0]
    for run in runs:
        edges.append(edges[-1] + len(run))
    return torch.cat(runs), tuple(edges)


def cell_sums(codes: torch.Tensor, edges: tuple[int, ...]) -> torch.Tensor:
    """(B, positions, K) codes in cell order -> (B, cells K) float32 sums, one run of rows
    per cell: each code is read once, accumulated in float32 (bfloat16 codes round once)."""
    return torch.cat([codes[:, start:end].sum(1, dtype=torch.float32)
                      for start, end in zip(edges, edges[1:])], 1)


def grid_pool(maps: torch.Tensor, cells: int = 2) -> torch.Tensor:
    """(B, H', W', K) -> (B, cells^2 K) float32: sums over a cells x cells grid of the
    positions, row-major (each block of K features); ``cells`` 2 is the protocol's
    quadrants (top-left, top-right, bottom-left, bottom-right), 1 sums every position."""
    b, h, w, k = maps.shape
    order, edges = cell_order(h, w, cells)
    return cell_sums(maps.reshape(b, h * w, k)[:, order], edges)


def quadrant_pool(maps: torch.Tensor) -> torch.Tensor:
    """The protocol's pooling: ``grid_pool(maps, 2)``, (B, H', W', K) -> (B, 4K)."""
    return grid_pool(maps, 2)


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX).
    Without it torch emulates them: on an AVX2 AMD EPYC here a bfloat16 extraction ran 25x
    slower than float32 (27 s against 1.1 s for 1,000 images at K = 1,600)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolved_precision(precision: str) -> str:
    """``auto``: bf16 where the CPU has bfloat16 products in hardware, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


def pooled_features(images: torch.Tensor, patches: WhitenedPatches, encoder: Encoder,
                    precision: str = "fp32", cells: int = 2) -> torch.Tensor:
    """(B, H, W) images -> (B, cells^2 K) encoder outputs at every position, sum-pooled over a
    cells x cells grid (2: the protocol's quadrants, 4K features).

    ``precision="bf16"`` runs the encoder under CPU autocast: its matrix products (the
    whole cost: positions x D x K multiply-adds per image) in bfloat16 with float32
    accumulation, 3.4x the float32 rate measured for these thin (D = 36) products on
    avx512_bf16 cores; the per-code error is bfloat16's rounding (2^-9 relative) and the
    pooled sums stay float32. The whitening convolution (D outputs, not K) stays float32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    whitened = patches(images)
    b, h, w, d = whitened.shape
    # The positions reordered cell by cell in the copy that makes the rows contiguous
    # anyway, so that pooling is one sum per cell over a run of rows. (A (cells^2 x
    # positions) pooling product per image did cells^2 times the additions: 19% of the
    # extraction's time at K = 1,600, against 4% for the sums.)
    order, edges = cell_order(h, w, cells)
    rows = whitened.reshape(b, h * w, d).index_select(1, order)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        codes = encoder(rows.reshape(b * h * w, d))
    return cell_sums(codes.reshape(b, h * w, -1), edges)


CODE_BUDGET = 8 * 2**20
"""Bytes of (positions x K) float32 codes per batch and worker: 2 images at K = 1,600. Small
batches whose buffers are reused beat large fresh ones: at K = 1,600 with relu, 60 CPU s per
70,000 images against 245 s with 256 MB batches of fresh buffers, and 62 s with 32 MB
(bench/single_layer_extraction.py, docs/analysis.md "Time")."""


def images_per_batch(positions: int, features: int, budget_bytes: int = CODE_BUDGET) -> int:
    """How many images to encode at once so the (positions x K) codes stay within budget."""
    return max(1, budget_bytes // (4 * positions * max(features, 1)))


def default_workers() -> int:
    """Extraction threads: one per core torch may use (each runs its ops on one thread)."""
    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def single_threaded_ops():
    """torch's intra-op parallelism off for the duration: the extraction's products are small
    (rows of 36 values), and a team of OpenMP threads per product cost more than it gained
    on the shared 2-core machine; the images are split across worker threads instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def extract(images: np.ndarray, patches: WhitenedPatches, encoder: Encoder, features: int,
            out: Optional[Path] = None, budget_bytes: int = CODE_BUDGET,
            precision: str = "fp32", workers: Optional[int] = None,
            cells: int = 2) -> np.ndarray:
    """Pooled features of (N, H, W) images as an (N, cells^2 K) float16 array (a cells x
    cells pooling grid; 2: the protocol's quadrants): in memory, or a memory map at ``out``
    (what a large set needs). Each grid cell's sum is divided by its
    number of positions before storing (a constant per feature, which the probe's
    standardisation removes) so that float16 does not overflow.

    ``workers`` threads (default: torch's thread count) take every ``workers``-th batch, each
    running its ops single-threaded and writing its own rows; the encoder is called from
    several threads at once (AffineEncoder and the triangle keep one buffer per thread)."""
    n, height, width = images.shape
    ph, pw = patches.positions(height, width)
    if ph < 1 or pw < 1:
        raise ConfigError(f"the run's {patches.side}x{patches.side} patches do not fit "
                          f"{height}x{width} images")
    if not 1 <= cells <= min(ph, pw):
        raise ConfigError(f"--pool-grid {cells}: allowed 1 to {min(ph, pw)} (the {ph}x{pw} "
                          "patch positions of these images)")
    rows, cols = grid_bounds(ph, cells), grid_bounds(pw, cells)
    counts = torch.tensor([len(range(ph)[r]) * len(range(pw)[c]) for r in rows for c in cols],
                          dtype=torch.float32).repeat_interleave(features)
    shape = (n, cells * cells * features)
    result = (np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=shape)
              if out is not None else np.empty(shape, np.float16))
    step = images_per_batch(ph * pw, features, budget_bytes)
    starts = list(range(0, n, step))
    workers = max(1, min(workers or default_workers(), len(starts)))

    def work(mine: list[int]) -> None:
        with torch.no_grad():  # grad mode is per thread
            for start in mine:
                batch = torch.from_numpy(
                    np.ascontiguousarray(images[start:start + step], np.float32))
                pooled = pooled_features(batch, patches, encoder, precision, cells).div_(counts)
                if not torch.isfinite(pooled).all() or pooled.abs().max() > 6e4:
                    raise ValueError("features overflow float16 (|value| > 6e4)")
                result[start:start + len(batch)] = pooled.numpy().astype(np.float16)

    with single_threaded_ops():
        if workers == 1:
            work(starts)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, [starts[i::workers] for i in range(workers)]))
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

