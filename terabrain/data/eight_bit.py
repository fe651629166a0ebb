"""8-bit examples: held as the photographs' own uint8 pixels, made float32 as rows are taken.

A data set of photographs that is not preprocessed (no mean removal, LCN or whitening) is
kept as its uint8 pixels, a quarter of the float32 bytes (lbann-ae-small: 31 MB instead of
123 MB; on a GPU the same saving applies to device memory). Rows become float32 when a batch
is formed, divided by 255 in float32 exactly as the float path divides a whole photograph,
so a run gives the same bits either way (tests/test_eight_bit.py).
"""

from __future__ import annotations

import numpy as np
import torch

PIXEL_MAX = 255


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 examples in [0, 1]: 8-bit pixels divided by 255; floats unchanged."""
    if x.is_floating_point():
        return x
    return x.to(torch.float32).div_(PIXEL_MAX)


def unit_float_array(x: np.ndarray) -> np.ndarray:
    """The NumPy form of ``unit_float``, for preprocessing that needs floats."""
    if np.issubdtype(x.dtype, np.floating):
        return x
    return x.astype(np.float32) / np.float32(PIXEL_MAX)
