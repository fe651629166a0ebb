"""Data sets that ship inside installed packages, so the demo needs no download.

The natural photographs come from scikit-image and scikit-learn; the 8x8 digits from
scikit-learn. Everything is returned as float32 NumPy arrays in [0, 1].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def to_grey(images: np.ndarray, spatial_dims: int = 2) -> np.ndarray:
    """Grey from RGB(A) in the last axis; arrays with only ``spatial_dims`` axes (2 for one
    image, 3 for a batch) are grey already."""
    if images.ndim == spatial_dims:
        return images
    # ITU-R 601 luma, the weights skimage.color.rgb2gray uses.
    return images[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_colour(images: np.ndarray, spatial_dims: int = 2) -> np.ndarray:
    """RGB in the last axis: grey repeated, RGBA's alpha dropped."""
    if images.ndim == spatial_dims:
        return np.repeat(images[..., None], 3, axis=-1)
    return images[..., :3]


# Files of the photographs inside their packages, where the name differs from the function
# that scikit-image offers for it.
_SKIMAGE_FILES = {"immunohistochemistry": "ihc.png", "clock": "clock_motion.png",
                  "rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg"}


def load_photo(name: str, color: bool = False, eight_bit: bool = False) -> np.ndarray:
    """One bundled photograph as float32 in [0, 1], shape (H, W) or, with ``color``,
    (H, W, 3). ``eight_bit``: its uint8 pixels instead where the conversion needs no
    arithmetic (colour, or a grey photograph asked for in grey; terabrain.data.eight_bit)."""
    if name in SKIMAGE_PHOTOS:
        raw = _package_image("skimage", "data", _SKIMAGE_FILES.get(name, f"{name}.png"))
    elif name in SKLEARN_PHOTOS:
        raw = _package_image("sklearn", "datasets/images", f"{name}.jpg")
    else:
        raise KeyError(f"unknown photograph {name!r}; choose from {', '.join(PHOTOS)}")
    if eight_bit and raw.dtype == np.uint8 and (color or raw.ndim == 2):
        return to_colour(raw) if color else raw
    image = _to_float(raw)
    return to_colour(image) if color else to_grey(image)


def _package_image(package: str, folder: str, filename: str) -> np.ndarray:
    """A sample image shipped inside ``package``, read with PIL as the package's own loader
    reads it (the same pixels: tests/test_embedded_photos.py), without importing the
    package: scikit-learn's import holds about 50 MB for the rest of the run and
    scikit-image's loaders about 27 MB (imageio, tifffile, SciPy), a quarter of a byte per
    parameter of the largest autoencoders on one machine."""
    from PIL import Image

    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise KeyError(f"the sample image {filename} needs {package} installed")
    path = Path(spec.submodule_search_locations[0]) / folder / filename
    with Image.open(path) as image:
        return np.asarray(image)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: images (N, 64) in [0, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
