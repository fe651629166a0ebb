"""Decoding one image file and the seed-000 preprocessing: centre, scale the smaller side to
``crop`` pixels, crop ``crop`` x ``crop`` around the centre, optionally resize, grey or colour.

Every failure to read an image (truncated JPEG, a file that is no image, an unknown format)
becomes ``BadSample`` naming the file, so the loader can skip and count it or stop with
the name: never a partially decoded, silently wrong example.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from terabrain.errors import TrainingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadSample(TrainingError):
    """An example that cannot be read; the message names the file (and member)."""

    def __init__(self, name: str, reason: str = ""):
        super().__init__(f"{name}: {reason}" if reason else name)
        self.name = name
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries (DataLoader workers) intact
        return (BadSample, (self.name, self.reason))


@dataclass(frozen=True)
class ImageSpec:
    """What every decoded image becomes: ``crop`` x ``crop`` (Ni et al. 2015: 300), then
    ``size`` x ``size`` if set, grey (H, W) or colour (H, W, 3), float32 in [0, 1]."""

    crop: int = 300
    size: Optional[int] = None
    color: bool = False

    @property
    def side(self) -> int:
        return self.size or self.crop

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.side, self.side) + ((3,) if self.color else ())


def decode(data: bytes, name: str, spec: ImageSpec) -> np.ndarray:
    """Bytes of an image file -> preprocessed float32 array of ``spec.shape``."""
    return to_unit(decode_pixels(data, name, spec))


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]: the one conversion every reader shares, so an image
    read from pre-decoded shards is bit-identical to the same image decoded from its file."""
    return np.multiply(pixels, np.float32(1.0 / 255.0), dtype=np.float32)  # one pass, one array


def decode_pixels(data: bytes, name: str, spec: ImageSpec) -> np.ndarray:
    """Bytes of an image file -> preprocessed uint8 array of ``spec.shape``."""
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in the process asked Pillow to pad truncated files with grey: that would
        # turn a damaged file into a silently wrong example.
        raise TrainingError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; terabrain refuses "
                            "to read truncated images as if they were whole")
    if not data:
        raise BadSample(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _preprocess(image, spec)
    except BadSample:
        raise
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadSample(name, unreadable_reason(error)) from None


def unreadable_reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image (unknown format)"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"not a readable image ({reason[:200]})"


def _preprocess(image, spec: ImageSpec) -> np.ndarray:
    """Scale the smaller side to ``crop`` and keep the centre ``crop`` x ``crop``, then
    resize to ``size``: done in one step as "scale the smaller side to ``side`` and keep the
    centre ``side`` x ``side``", the same region of the photograph, resampled once."""
    from PIL import Image

    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image of size {width}x{height}")
    mode = "RGB" if spec.color else "L"
    side = spec.side
    # JPEG can decode directly at 1/2, 1/4, 1/8 scale (never below the requested size):
    # most of the decode cost of a large photograph disappears when the output is small.
    scale = side / min(width, height)
    image.draft(mode, (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()  # raises on a truncated or corrupt file
    image = image.convert(mode)
    width, height = image.size
    # The centre square of the (possibly draft-scaled) image, in its own pixels.
    # Cropped before resampling, so no pixel outside the square leaks in at its edges.
    square = min(width, height)
    left, top = (width - square) // 2, (height - square) // 2
    image = image.crop((left, top, left + square, top + square))
    if square != side:
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
