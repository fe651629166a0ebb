"""The bundled photographs are read with PIL straight from the packages' files: the pixels
must be the ones the packages' own loaders give, and reading them must not import the
packages (their imports stay resident for the whole run: docs/memory.md)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from terabrain.data.embedded import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, _package_image, _SKIMAGE_FILES


@pytest.mark.parametrize("name", SKIMAGE_PHOTOS)
def test_scikit_image_photographs_equal_its_loader(name):
    skimage_data = pytest.importorskip("skimage.data")
    ours = _package_image("skimage", "data", _SKIMAGE_FILES.get(name, f"{name}.png"))
    theirs = getattr(skimage_data, name)()
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", SKLEARN_PHOTOS)
def test_scikit_learn_photographs_equal_its_loader(name):
    datasets = pytest.importorskip("sklearn.datasets")
    ours = _package_image("sklearn", "datasets/images", f"{name}.jpg")
    assert np.array_equal(ours, datasets.load_sample_image(f"{name}.jpg"))


def test_reading_photographs_imports_neither_package():
    code = (
        "import sys\n"
        "from terabrain.data.embedded import PHOTOS, load_photo\n"
        "for name in PHOTOS: load_photo(name, color=True)\n"
        "print(sorted(m for m in ('skimage', 'sklearn', 'scipy', 'imageio') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
