"""Turn an experiment's `data` section into training and held-out tensors.

Everything here is a deterministic function of the config and the seed, so a resumed run
rebuilds exactly the same data instead of storing it in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from terabrain.config.schema import DataConfig
from terabrain.data.embedded import load_digits, load_photo
from terabrain.data.patches import remove_patch_mean, sample_patches
from terabrain.data.whitening import ZCA
from terabrain.errors import ConfigError


@dataclass
class PreparedData:
    train_x: torch.Tensor
    holdout_x: torch.Tensor
    example_shape: tuple[int, ...]
    """Shape of one example as an image (H, W) or (H, W, C), for filter pictures."""
    train_y: Optional[torch.Tensor] = None
    holdout_y: Optional[torch.Tensor] = None
    whitening: Optional[ZCA] = None

    @property
    def inputs(self) -> int:
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


def prepare_data(config: DataConfig, seed: int) -> PreparedData:
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
        if config.source == "digits":
            data, labels = load_digits()
            shape = (8, 8)
        else:
            data, labels, shape = _load_npy(config)
        train_rows, test_rows = _split(len(data), config.test_fraction, rng)
        train, holdout = data[train_rows], data[test_rows]
        if labels is not None:
            labels = (labels[train_rows], labels[test_rows])

    channels = shape[2] if len(shape) == 3 else 1
    if config.remove_mean:
        train = remove_patch_mean(train, channels)
        holdout = remove_patch_mean(holdout, channels)
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
