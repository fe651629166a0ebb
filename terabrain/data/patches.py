"""Random square patches from a list of images, and per-patch mean removal."""

from __future__ import annotations

import numpy as np


def sample_patches(
    images: list[np.ndarray], size: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` patches of ``size`` x ``size`` (x channels), flattened to rows, in the
    images' dtype (uint8 pixels stay uint8) or float32 if the images differ.

    Each patch comes from an image chosen with probability proportional to its area, so
    large photographs are not under-represented; positions are uniform inside the image.
    """
    usable = [im for im in images if im.shape[0] >= size and im.shape[1] >= size]
    if not usable:
        raise ValueError(f"no image is at least {size}x{size} pixels")
    areas = np.array([(im.shape[0] - size + 1) * (im.shape[1] - size + 1) for im in usable])
    which = rng.choice(len(usable), size=count, p=areas / areas.sum())
    channels = 1 if usable[0].ndim == 2 else usable[0].shape[2]
    dtype = usable[0].dtype if all(im.dtype == usable[0].dtype for im in usable) else np.float32
    out = np.empty((count, size * size * channels), dtype=dtype)
    # Each image's rows in increasing order, as np.flatnonzero(which == index) would give,
    # from one stable sort instead of one scan of ``which`` per image (60,000 scans of every
    # row for Fashion-MNIST's training images).
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(usable) + 1))
    for index, image in enumerate(usable):
        rows = order[bounds[index]:bounds[index + 1]]
        if rows.size == 0:
            continue
        top = rng.integers(0, image.shape[0] - size + 1, size=rows.size)
        left = rng.integers(0, image.shape[1] - size + 1, size=rows.size)
        for row, y, x in zip(rows, top, left):
            out[row] = image[y : y + size, x : x + size].reshape(-1)
    return out


def remove_patch_mean(patches: np.ndarray, channels: int = 1) -> np.ndarray:
    """Subtract each patch's own mean brightness (per channel), as Ni et al. 2015 and Coates
    et al. 2013 do before whitening: the DC component carries no edge information and dominates the variance."""
    n, d = patches.shape
    by_channel = patches.reshape(n, d // channels, channels)
    return (by_channel - by_channel.mean(axis=1, keepdims=True)).reshape(n, d)
