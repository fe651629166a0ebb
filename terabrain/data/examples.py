"""From a catalog entry to training rows: decode + seed-000 preprocessing (or, for
pre-decoded shards, the stored pixels), then either the whole image as one example or
``patches`` random square patches of it, flattened.

Patch positions are drawn from a generator seeded by (seed, epoch, example), so the rows an
example yields do not depend on which worker decoded it, how many workers there are, or
whether the run was resumed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from terabrain.data.catalogs import Catalog
from terabrain.data.decode import ImageSpec, decode_pixels, to_unit

# "Epoch" used for rows that are not training rows (whitening fit, held-out set).
OUTSIDE_TRAINING = -1


class ImageExamples:
    def __init__(self, catalog: Catalog, spec: ImageSpec, seed: int,
                 patch_size: Optional[int] = None, patches: int = 0):
        if patches and patch_size > spec.side:
            raise ValueError(f"patch_size {patch_size} is larger than the {spec.side}-pixel images")
        self.catalog = catalog
        self.spec = spec
        self.seed = seed
        self.patch_size = patch_size
        self.patches = patches
        # Pre-decoded shards skip the decoder; ConfigError if they hold other pixels than spec.
        root = getattr(catalog, "location", None)
        self.pixels = catalog.decoded.reader(spec, root) if catalog.decoded is not None else None

    @property
    def per_sample(self) -> int:
        return self.patches or 1

    @property
    def example_shape(self) -> tuple[int, ...]:
        if not self.patches:
            return self.spec.shape
        return (self.patch_size, self.patch_size) + self.spec.shape[2:]

    @property
    def dim(self) -> int:
        return int(np.prod(self.example_shape))

    def __len__(self) -> int:
        return len(self.catalog)

    def __call__(self, index: int, epoch: int) -> np.ndarray:
        data, name = self.catalog.read(index), self.catalog.name(index)
        image = decode_pixels(data, name, self.spec) if self.pixels is None else self.pixels(data, name)
        if not self.patches:
            return to_unit(image).reshape(1, -1)
        rng = np.random.default_rng([self.seed, epoch + 1, index])
        side = self.patch_size
        top = rng.integers(0, image.shape[0] - side + 1, size=self.patches)
        left = rng.integers(0, image.shape[1] - side + 1, size=self.patches)
        # Patches cut from the uint8 pixels: only they are converted to float.
        return to_unit(np.stack([image[y : y + side, x : x + side].reshape(-1) for y, x in zip(top, left)]))


class ArrayExamples:
    """Rows of an array (a ``.npy`` memory map: only the rows a batch needs are read)."""

    def __init__(self, array: np.ndarray, name: str):
        self.array = array
        self.name = name
        self.example_shape = tuple(array.shape[1:])
        self.dim = int(np.prod(self.example_shape))
        self.per_sample = 1

    def __len__(self) -> int:
        return len(self.array)

    def __call__(self, index: int, epoch: int) -> np.ndarray:
        return np.asarray(self.array[index], dtype=np.float32).reshape(1, -1)
