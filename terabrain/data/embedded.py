"""Data sets that ship inside installed packages, so the demo needs no download.

The natural photographs come from scikit-image and scikit-learn; the 8x8 digits from
scikit-learn. Everything is returned as float32 NumPy arrays in [0, 1].
"""

from __future__ import annotations

import numpy as np

# Photographs of natural scenes (and natural textures). Synthetic images (logo, colorwheel,
# text pages) are left out: they would teach the network their artificial statistics.
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "grass", "gravel", "brick",
    "coins", "moon", "hubble_deep_field", "immunohistochemistry", "clock", "cell",
)
SKLEARN_PHOTOS = ("china", "flower")
PHOTOS = SKIMAGE_PHOTOS + SKLEARN_PHOTOS


def _to_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    # ITU-R 601 luma, the weights skimage.color.rgb2gray uses.
    return image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _colour(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def load_photo(name: str, color: bool = False) -> np.ndarray:
    """One bundled photograph as float32, shape (H, W) or, with ``color``, (H, W, 3)."""
    if name in SKIMAGE_PHOTOS:
        import skimage.data

        raw = getattr(skimage.data, name)()
    elif name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        raw = load_sample_image(f"{name}.jpg")
    else:
        raise KeyError(f"unknown photograph {name!r}; choose from {', '.join(PHOTOS)}")
    image = _to_float(raw)
    return _colour(image) if color else _grey(image)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: images (N, 64) in [0, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
