"""Turn an experiment's `data` section into training and held-out tensors.

Everything here is a deterministic function of the config and the seed, so a resumed run
rebuilds exactly the same data instead of storing it in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from terabrain.config.schema import DataConfig
from terabrain.data.embedded import load_digits, load_photo
from terabrain.data.labelled import load_fashion_mnist, load_lfw_subset
from terabrain.data.contrast import normalize_contrast
from terabrain.data.patches import remove_patch_mean, sample_patches
from terabrain.data.whitening import ZCA
from terabrain.errors import ConfigError

if TYPE_CHECKING:
    from terabrain.data.streamed_source import StreamSource


@dataclass
class PreparedData:
    train_x: torch.Tensor
    holdout_x: torch.Tensor
    example_shape: tuple[int, ...]
    """Shape of one example as an image (H, W) or (H, W, C), for filter pictures."""
    train_y: Optional[torch.Tensor] = None
    holdout_y: Optional[torch.Tensor] = None
    whitening: Optional[ZCA] = None
    stream: Optional["StreamSource"] = None
    """Set for streamed collections: ``train_x`` is then None and training reads batches
    from ``stream.open(...)`` (see terabrain.data.streaming)."""

    @property
    def inputs(self) -> int:
        if self.train_x is None:
            return int(np.prod(self.example_shape))
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_y, self.holdout_y]).max()) + 1


def _split(rows: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(rows)
    test = max(1, int(round(rows * fraction)))
    return order[test:], order[:test]


def _load_npy(config: DataConfig) -> tuple[np.ndarray, Optional[np.ndarray], tuple[int, ...]]:
    try:
        array = np.load(config.path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.path: cannot read {config.path} as .npy: {error}") from None
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.number):
        raise ConfigError(
            f"data.path: expected a numeric array of shape (N, D) or (N, H, W[, C]), "
            f"got {array.dtype} {array.shape}"
        )
    shape = tuple(array.shape[1:]) if array.ndim > 2 else (array.shape[1],)
    data = np.asarray(array, dtype=np.float32).reshape(len(array), -1)
    labels = None
    if config.labels_path is not None:
        labels = np.load(config.labels_path, allow_pickle=False)
        if len(labels) != len(data):
            raise ConfigError(
                f"data.labels_path: {len(labels)} labels for {len(data)} rows in data.path"
            )
    return data, labels, shape


def _prepare_stream(config: DataConfig, seed: int) -> PreparedData:
    from terabrain.data.streamed_source import StreamSource

    source = StreamSource(config, seed)
    return PreparedData(None, source.holdout_x, source.example_shape,
                        whitening=source.whitening, stream=source)


def _load_labelled(config: DataConfig) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    if config.source == "digits":
        data, labels = load_digits()
        return data, labels, (8, 8)
    if config.source == "lfw":
        images, labels = load_lfw_subset()
    else:
        try:
            images, labels = load_fashion_mnist("train")
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.source fashion-mnist: {error}") from None
    return images.reshape(len(images), -1), labels, tuple(images.shape[1:])


def prepare_data(config: DataConfig, seed: int) -> PreparedData:
    from terabrain.data.streamed_source import is_streamed

    if is_streamed(config):
        return _prepare_stream(config, seed)
    rng = np.random.default_rng(seed)
    labels = None
    if config.source == "photos":
        images = [load_photo(name, config.color) for name in config.photos]
        patches = sample_patches(
            images, config.patch_size, config.num_patches + config.holdout_patches, rng
        )
        train, holdout = patches[: config.num_patches], patches[config.num_patches :]
        shape = (config.patch_size, config.patch_size) + ((3,) if config.color else ())
    elif config.source == "face_mix":
        from terabrain.data.faces import face_mix

        images = face_mix(config.num_patches + config.holdout_patches, config.patch_size,
                          config.face_fraction, rng)
        train, holdout = images[: config.num_patches], images[config.num_patches :]
        shape = (config.patch_size, config.patch_size)
    else:
        if config.source == "npy":
            data, labels, shape = _load_npy(config)
        else:
            data, labels, shape = _load_labelled(config)
        if config.source == "fashion-mnist":
            # The published split: train for training, test held out.
            test_images, test_labels = load_fashion_mnist("test")
            train, holdout = data, test_images.reshape(len(test_images), -1)
            labels = (labels, test_labels)
        else:
            train_rows, test_rows = _split(len(data), config.test_fraction, rng)
            train, holdout = data[train_rows], data[test_rows]
            if labels is not None:
                labels = (labels[train_rows], labels[test_rows])

    channels = shape[2] if len(shape) == 3 else 1
    if config.remove_mean:
        train = remove_patch_mean(train, channels)
        holdout = remove_patch_mean(holdout, channels)
    if config.lcn is not None:
        train = normalize_contrast(train, shape, config.lcn.kernel, config.lcn.sigma)
        holdout = normalize_contrast(holdout, shape, config.lcn.kernel, config.lcn.sigma)
    whitening = None
    if config.whitening == "zca":
        whitening = ZCA.fit(train[: config.whitening_fit_samples], config.whitening_epsilon)
        train, holdout = whitening.apply(train), whitening.apply(holdout)

    prepared = PreparedData(
        train_x=torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32)),
        holdout_x=torch.from_numpy(np.ascontiguousarray(holdout, dtype=np.float32)),
        example_shape=shape,
        whitening=whitening,
    )
    if labels is not None:
        dtype = torch.int64 if np.issubdtype(labels[0].dtype, np.integer) else torch.float32
        prepared.train_y = torch.as_tensor(labels[0], dtype=dtype)
        prepared.holdout_y = torch.as_tensor(labels[1], dtype=dtype)
    return prepared
