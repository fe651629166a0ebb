"""Turn an experiment's `data` section into training and held-out tensors.

Everything here is a deterministic function of the config and the seed, so a resumed run
rebuilds exactly the same data instead of storing it in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from terabrain.data.contrast import normalize_contrast
from terabrain.data.eight_bit import unit_float_array
from terabrain.data.patches import remove_patch_mean
from terabrain.data.sources import DataSection, preprocessed, source_of
from terabrain.data.whitening import ZCA

if TYPE_CHECKING:
    from terabrain.data.streamed_source import StreamSource


@dataclass
class PreparedData:
    train_x: torch.Tensor
    """float32 rows, or uint8 pixels (value / 255) for photographs without preprocessing:
    take rows through terabrain.data.eight_bit.unit_float."""
    holdout_x: torch.Tensor
    example_shape: tuple[int, ...]
    """Shape of one example as an image (H, W) or (H, W, C), for filter pictures."""
    train_y: Optional[torch.Tensor] = None
    holdout_y: Optional[torch.Tensor] = None
    whitening: Optional[ZCA] = None
    stream: Optional["StreamSource"] = None
    """Set for streamed collections: ``train_x`` is then None and training reads batches
    from ``stream.open(...)`` (see terabrain.data.streamed_source)."""

    @property
    def inputs(self) -> int:
        if self.train_x is None:
            return int(np.prod(self.example_shape))
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_y, self.holdout_y]).max()) + 1


def _prepare_stream(config: DataSection, seed: int, replicas=None) -> PreparedData:
    from terabrain.data.streamed_source import StreamSource

    source = StreamSource(config, seed, replicas=replicas)
    return PreparedData(None, source.holdout_x, source.example_shape,
                        whitening=source.whitening, stream=source)


def prepare_data(config: DataSection, seed: int, replicas=None) -> PreparedData:
    """``replicas``: the data-parallel group (``DataParallel``: rank, size, group) when
    training on several ranks; under ``data.order: shard_affine`` the held-out set and the
    whitening sample then come from each replica's own shards."""
    source = source_of(config)
    if source.streamed(config):
        return _prepare_stream(config, seed, replicas)
    loaded = source.load(config, np.random.default_rng(seed))
    train, holdout, shape, labels = loaded.train, loaded.holdout, loaded.shape, loaded.labels
    # 8-bit training pixels stay 8-bit unless preprocessing needs floats; the held-out set
    # is small and read whole by the callbacks, so it is always float32.
    holdout = unit_float_array(holdout)
    if preprocessed(config):
        train = unit_float_array(train)

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
        train_x=torch.from_numpy(np.ascontiguousarray(
            train, dtype=train.dtype if train.dtype == np.uint8 else np.float32)),
        holdout_x=torch.from_numpy(np.ascontiguousarray(holdout, dtype=np.float32)),
        example_shape=shape,
        whitening=whitening,
    )
    if labels is not None:
        dtype = torch.int64 if np.issubdtype(labels[0].dtype, np.integer) else torch.float32
        prepared.train_y = torch.as_tensor(labels[0], dtype=dtype)
        prepared.holdout_y = torch.as_tensor(labels[1], dtype=dtype)
    return prepared
