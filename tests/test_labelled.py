import gzip

import numpy as np
import pytest

from terabrain.data.labelled import (
    fashion_mnist_available, load_fashion_mnist, load_lfw_subset, read_idx,
)


def _write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def test_idx_round_trip_and_truncation(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    with gzip.open(tmp_path / "a.gz", "rb") as handle:
        raw = handle.read()
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(raw[:-5])
    with pytest.raises(ValueError, match="header promises"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "junk")


def test_lfw_subset():
    images, labels = load_lfw_subset()
    assert images.shape == (200, 25, 25) and labels.sum() == 100
    assert 0.0 <= images.min() and images.max() <= 1.0


@pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.float32
    assert np.bincount(labels).tolist() == [1000] * 10


def _write_fashion_mnist(root, count=3):
    root.mkdir()
    for prefix in ("train", "t10k"):
        images = np.arange(count * 28 * 28, dtype=np.uint64).reshape(count, 28, 28) % 256
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count, dtype=np.uint8))


def test_fashion_mnist_from_a_directory_given_or_named_by_the_variable(tmp_path, monkeypatch):
    _write_fashion_mnist(tmp_path / "given")
    monkeypatch.setenv("TERABRAIN_FASHION_MNIST", str(tmp_path / "elsewhere"))
    assert fashion_mnist_available(tmp_path / "given") and not fashion_mnist_available()
    images, labels = load_fashion_mnist("test", tmp_path / "given")
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_fashion_mnist("train")
    monkeypatch.setenv("TERABRAIN_FASHION_MNIST", str(tmp_path / "given"))  # read at each call
    assert fashion_mnist_available() and load_fashion_mnist("train")[0].shape == (3, 28, 28)
