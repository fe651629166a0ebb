"""Local contrast normalization of example rows, as a data transform (the layer itself is
terabrain.nn.normalization)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from terabrain.nn.normalization import local_contrast_normalize


def normalize_contrast(rows: np.ndarray, example_shape: tuple[int, ...], kernel: int,
                       sigma: Optional[float]) -> np.ndarray:
    """Rows of flattened (H, W) or (H, W, C) images -> the same rows after LCN."""
    if len(example_shape) not in (2, 3):
        raise ValueError(f"data.lcn needs image examples, got rows of shape {example_shape}")
    height, width = example_shape[:2]
    channels = example_shape[2] if len(example_shape) == 3 else 1
    images = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    images = images.view(len(rows), height, width, channels).permute(0, 3, 1, 2)
    with torch.no_grad():
        normalized = local_contrast_normalize(images, kernel, sigma)
    return normalized.permute(0, 2, 3, 1).reshape(len(rows), -1).numpy()
