"""Labelled image sets available offline: scikit-image's ``lfw_subset`` (faces against
non-faces) and Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files).

Images come back as float32 in [0, 1], shape (N, H, W); labels as int64.

Fashion-MNIST's directory is an argument of its loaders; without one they use
``default_fashion_mnist_dir()``: ``$TERABRAIN_FASHION_MNIST`` if set, else where the Debian
package puts it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "TERABRAIN_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not. The header is checked against the
    file's length, so a truncated download is an error instead of a short array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, the header promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def default_fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST is looked for when no directory is given: the directory in
    ``$TERABRAIN_FASHION_MNIST`` (read at each call), else Debian's dataset-fashion-mnist."""
    return Path(os.environ.get(FASHION_MNIST_ENV, DEBIAN_FASHION_MNIST_DIR))


def fashion_mnist_available(root: Optional[Path] = None) -> bool:
    """Whether the idx files are in ``root`` (default: ``default_fashion_mnist_dir()``)."""
    root = Path(root) if root is not None else default_fashion_mnist_dir()
    return (root / "t10k-labels-idx1-ubyte.gz").exists()


def load_fashion_mnist(split: str = "train", root: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) from the idx files in ``root``
    (default: ``default_fashion_mnist_dir()``): images (N, 28, 28), labels (N,)."""
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST split {split!r}; allowed: train, test")
    root = Path(root) if root is not None else default_fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(
            f"{images_path} not found: install Debian's dataset-fashion-mnist package "
            f"(apt-get install dataset-fashion-mnist), set {FASHION_MNIST_ENV}, or pass its directory"
        )
    images = read_idx(images_path).astype(np.float32) / 255.0
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_lfw_subset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's 200 LFW crops, 25x25 grey: labels 1 for the 100 faces, 0 for the
    100 non-faces."""
    import skimage.data

    images = skimage.data.lfw_subset().astype(np.float32)
    labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    return images, labels
