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


# A picture of a large model shows its first MAX_FILTERS filters, each at most MAX_CELL_PX
# pixels on a side (block-averaged): 256 cells of 64 x 64 x 3 are about 3 MB before PNG
# compression, whatever the model's size (1,000 filters of 256 x 256 x 3 were 197 MB).
MAX_FILTERS = 256
MAX_CELL_PX = 64


def _shrunk(w: np.ndarray, down: int, across: int) -> np.ndarray:
    """(H, W, C) averaged over ``down`` x ``across`` blocks (edges cropped). Each axis has
    its own factor: one shared factor, set by the longer side, emptied the short side of a
    1 x D strip (a flat .npy row of 3,072 values crashed the end of the run)."""
    if down == across == 1:
        return w
    height, width = (w.shape[0] // down) * down, (w.shape[1] // across) * across
    w = w[:height, :width]
    return w.reshape(height // down, down, width // across, across, -1).mean(axis=(1, 3))


def filter_grid(
    filters: torch.Tensor, example_shape: tuple[int, ...], min_cell_px: int = 32,
    max_filters: int = MAX_FILTERS, max_cell_px: int = MAX_CELL_PX,
) -> np.ndarray:
    """The first ``max_filters`` filters as one uint8 image (H, W, 3), one cell per hidden
    unit, each cell at most ``max_cell_px`` on a side (larger filters block-averaged).

    Each filter is scaled by its own largest absolute value, with zero drawn mid-grey, so
    polarity is visible and weak filters are not washed out. Grey filters are drawn grey;
    colour filters (example shape (H, W, 3)) in colour.
    """
    count = min(filters.shape[0], max_filters)
    weights = filters[:count].detach().float().cpu().numpy()
    example_shape = as_image_shape(example_shape)
    height, width = example_shape[:2]
    channels = example_shape[2] if len(example_shape) == 3 else 1
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    down, across = (max(1, math.ceil(side / max_cell_px)) for side in (height, width))
    scale = max(1, min_cell_px // max(height, width))
    cell_h, cell_w = (height // down) * scale, (width // across) * scale
    grid = np.full((rows * (cell_h + 1) + 1, columns * (cell_w + 1) + 1, 3), 255, np.uint8)
    for index in range(count):
        w = _shrunk(weights[index].reshape(height, width, channels), down, across)
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
    filters: torch.Tensor, example_shape: tuple[int, ...], holdout: torch.Tensor, seed: int = 0,
    max_filters: int = MAX_FILTERS, piece: int = 16,
) -> dict[str, float]:
    """Localization and response sparsity of ``filters`` beside random Gaussian filters of
    the same shape, on held-out data: medians over the first ``max_filters`` filters (the
    ones pictured), computed ``piece`` filters at a time, so that a large model costs no
    copy of its weights here (the random filters are drawn piece by piece too)."""
    generator = torch.Generator().manual_seed(seed)
    measured: dict[str, list[np.ndarray]] = {key: [] for key in (
        "spatial_spread_px", "random_spatial_spread_px", "response_kurtosis",
        "random_response_kurtosis")}
    for start in range(0, min(len(filters), max_filters), piece):
        block = filters[start:min(start + piece, max_filters)]
        random = torch.randn(block.shape, generator=generator)
        random = random / random.norm(dim=1, keepdim=True)
        measured["spatial_spread_px"].append(spatial_spread(block, example_shape))
        measured["random_spatial_spread_px"].append(spatial_spread(random, example_shape))
        measured["response_kurtosis"].append(response_kurtosis(block, holdout))
        measured["random_response_kurtosis"].append(response_kurtosis(random, holdout))
    return {key: float(np.median(np.concatenate(values))) for key, values in measured.items()}
