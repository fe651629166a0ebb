"""CPU and wall cost of `terabrain evaluate`'s extraction at K = 1,600 (6x6 patches of 28x28
images, 529 positions): the path before issue 15's speed work (the encoder module in float32,
four strided quadrant sums, 256 MB batches of fresh buffers) against the current one (affine
encoders as one product into a reused per-thread buffer, quadrant pooling as a product,
bfloat16 autocast, small batches split across worker threads), measured in the same run on
the same images. Prints CPU and wall seconds per 70,000 images (Fashion-MNIST's train + test)
and the ratios.

    python bench/single_layer_extraction.py [--images 500] [--features 1600]

On a shared machine wall time mostly measures the neighbours; CPU seconds are the steadier
figure (the current path runs one thread per core, so on an idle machine its wall time is
about its CPU seconds divided by the cores)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from terabrain.analysis.single_layer import (
    ThreadBuffers,
    WhitenedPatches,
    affine_encoder,
    affine_form,
    extract,
    quadrant_bounds,
)
from terabrain.nn.autoencoder import RICA
from terabrain.nn.kmeans import squared_distances, triangle


def slice_pool(maps: torch.Tensor) -> torch.Tensor:
    """The previous quadrant pooling: four strided slice sums."""
    rows, cols = quadrant_bounds(maps.shape[1]), quadrant_bounds(maps.shape[2])
    return torch.cat([maps[:, r, c].sum(dim=(1, 2), dtype=torch.float32)
                      for r in rows for c in cols], dim=1)


@torch.no_grad()
def baseline_extract(images: np.ndarray, patches: WhitenedPatches, encoder, k: int) -> np.ndarray:
    """The previous extraction: module encoder in float32, slice pooling, 256 MB batches."""
    step = max(1, 256 * 2**20 // (4 * 23 * 23 * k))
    out = np.empty((len(images), 4 * k), np.float16)
    for start in range(0, len(images), step):
        batch = torch.from_numpy(images[start:start + step])
        whitened = patches(batch)
        b, h, w, d = whitened.shape
        codes = encoder(whitened.reshape(b * h * w, d))
        out[start:start + b] = slice_pool(codes.reshape(b, h, w, -1)).numpy().astype(np.float16)
    return out


def previous_triangle(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The triangle as it was computed before: a new buffer per step."""
    z = squared_distances(x, centroids).sqrt()
    return (z.mean(dim=1, keepdim=True) - z).clamp_min(0.0)


def cpu_seconds(function) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result)."""
    begin, wall = time.process_time(), time.perf_counter()
    result = function()
    return time.process_time() - begin, time.perf_counter() - wall, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--features", type=int, default=1600)
    args = parser.parse_args()
    k = args.features
    images = np.random.default_rng(0).random((args.images, 28, 28)).astype(np.float32)
    patches = WhitenedPatches(6, True, None)
    rica = RICA(36, k, seed=0).eval()
    centroids = torch.randn(k, 36, generator=torch.Generator().manual_seed(0))
    form = affine_form(rica.encode, 36)
    assert form is not None
    buffers = ThreadBuffers()
    cases = {
        "RICA + relu": (lambda rows: torch.relu(rica.encode(rows)),
                        affine_encoder(*form, torch.relu_), "bf16"),
        "k-means triangle": (lambda rows: previous_triangle(rows, centroids),
                             lambda rows: triangle(rows, centroids,
                                                   out=buffers.get(rows.shape[0], k, torch.float32)),
                             "bf16"),
    }
    scale = 70000 / args.images
    print(f"{args.images} images, K = {k}; CPU seconds per 70,000 images")
    for name, (old, new, precision) in cases.items():
        baseline_extract(images[:8], patches, old, k)  # warm-up
        before, before_wall, reference = cpu_seconds(
            lambda old=old: baseline_extract(images, patches, old, k))
        after, after_wall, fast = cpu_seconds(lambda new=new, precision=precision: extract(
            images, patches, new, k, precision=precision))
        error = np.abs(fast.astype(np.float32)
                       - reference.astype(np.float32) / _counts(k)).max()
        print(f"{name:<18} before {before * scale:7.0f} CPU s ({before_wall * scale:6.0f} wall)   "
              f"now {after * scale:7.0f} CPU s ({after_wall * scale:6.0f} wall)   "
              f"ratio {before / after:4.1f}x CPU, {before_wall / after_wall:4.1f}x wall   "
              f"max |difference| {error:.3g}")


def _counts(k: int) -> np.ndarray:
    """extract stores quadrant means (sums / positions); the baseline stores sums."""
    rows, cols = quadrant_bounds(23), quadrant_bounds(23)
    return np.repeat([len(range(23)[r]) * len(range(23)[c]) for r in rows for c in cols], k)


if __name__ == "__main__":
    main()
