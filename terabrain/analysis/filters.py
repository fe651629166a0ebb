"""Pictures of filters, and two numbers that tell learned edge detectors from noise:
how localized each filter is and how sparse (heavy-tailed) its responses are."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def as_image_shape(example_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flat examples (D,) drawn as a square when D is one, else as a 1 x D strip."""
    if len(example_shape) != 1:
        return tuple(example_shape)
    side = math.isqrt(example_shape[0])
    return (side, side) if side * side == example_shape[0] else (1, example_shape[0])


def filter_grid(
    filters: torch.Tensor, example_shape: tuple[int, ...], min_cell_px: int = 32
) -> np.ndarray:
    """All filters as one uint8 image (H, W, 3), one cell per hidden unit.

    Each filter is scaled by its own largest absolute value, with zero drawn mid-grey, so
    polarity is visible and weak filters are not washed out. Grey filters are drawn grey;
    colour filters (example shape (H, W, 3)) in colour.
    """
    weights = filters.detach().float().cpu().numpy()
    count = weights.shape[0]
    example_shape = as_image_shape(example_shape)
    height, width = example_shape[:2]
    channels = example_shape[2] if len(example_shape) == 3 else 1
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = max(1, min_cell_px // max(height, width))
    cell_h, cell_w = height * scale, width * scale
    grid = np.full((rows * (cell_h + 1) + 1, columns * (cell_w + 1) + 1, 3), 255, np.uint8)
    for index in range(count):
        w = weights[index].reshape(height, width, channels)
        w = 0.5 + 0.5 * w / max(np.abs(w).max(), 1e-12)
        tile = np.repeat(np.repeat((w * 255).round().astype(np.uint8), scale, 0), scale, 1)
        if channels == 1:
            tile = np.repeat(tile, 3, axis=2)
        row, column = divmod(index, columns)
        top, left = 1 + row * (cell_h + 1), 1 + column * (cell_w + 1)
        grid[top : top + cell_h, left : left + cell_w] = tile[..., :3]
    return grid


def save_filter_grid(path: Path, filters: torch.Tensor, example_shape: tuple[int, ...]) -> None:
    Image.fromarray(filter_grid(filters, example_shape)).save(path)


def spatial_spread(filters: torch.Tensor, example_shape: tuple[int, ...]) -> np.ndarray:
    """Per filter: the root-mean-square distance (pixels) of its energy ``w^2`` from the
    energy's centroid. A filter spread evenly over an 8x8 patch scores about 3.2; a
    localized edge detector much less."""
    height, width = as_image_shape(example_shape)[:2]
    energy = filters.detach().float().cpu().numpy().reshape(len(filters), height, width, -1)
    energy = (energy**2).sum(axis=3)
    energy /= energy.sum(axis=(1, 2), keepdims=True) + 1e-12
    ys, xs = np.mgrid[0:height, 0:width]
    cy = (energy * ys).sum(axis=(1, 2))
    cx = (energy * xs).sum(axis=(1, 2))
    variance = (energy * ((ys - cy[:, None, None]) ** 2 + (xs - cx[:, None, None]) ** 2)).sum(
        axis=(1, 2)
    )
    return np.sqrt(variance)


def response_kurtosis(filters: torch.Tensor, data: torch.Tensor) -> np.ndarray:
    """Per filter: the excess kurtosis of its linear responses over ``data`` (rows). Sparse
    codes (mostly near zero, occasionally large) have high kurtosis; a Gaussian has 0."""
    responses = data.float() @ filters.float().T
    centred = responses - responses.mean(dim=0)
    variance = centred.pow(2).mean(dim=0).clamp_min(1e-12)
    return (centred.pow(4).mean(dim=0) / variance.pow(2) - 3.0).cpu().numpy()


def compare_with_random(
    filters: torch.Tensor, example_shape: tuple[int, ...], holdout: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """Localization and response sparsity of ``filters`` beside random Gaussian filters of
    the same shape, on held-out data."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(filters.shape, generator=generator)
    random = random / random.norm(dim=1, keepdim=True)
    return {
        "spatial_spread_px": float(np.median(spatial_spread(filters, example_shape))),
        "random_spatial_spread_px": float(np.median(spatial_spread(random, example_shape))),
        "response_kurtosis": float(np.median(response_kurtosis(filters, holdout))),
        "random_response_kurtosis": float(np.median(response_kurtosis(random, holdout))),
    }
