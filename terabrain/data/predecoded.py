"""Pre-decoded shards: each image stored already decoded and preprocessed (centre square,
scaled to its side, grey or colour) as a uint8 ``.npy`` member, so reading it costs a read
and a checksum instead of a JPEG decode.

``terabrain data pack SRC DEST --decode`` writes them; the index records the preprocessing
(``"decoded"``) and a CRC-32 of every member (``"crc32"`` per shard, beside ``"members"``)::

    "decoded": {"crop_size": 300, "image_size": null, "color": false,
                "shape": [300, 300], "dtype": "uint8", "member": "npy"}

A training configuration must ask for what the pack holds: the same colour mode, and a side
(``data.image_size``, or ``data.crop_size`` when no image size is set) no larger than the
stored one. The region is the same centre square whatever the side, so a smaller side is
derived by resizing the stored pixels (bilinear, as decoding does); it is then close to, not
bit-identical with, decoding the JPEG at that side (the decoder scales the JPEG directly).
Anything else is refused with a ConfigError naming the field.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from terabrain.data.decode import BadSample, ImageSpec
from terabrain.errors import ConfigError

MEMBER_SUFFIX = ".npy"


def is_member_name(name: str) -> bool:
    return name.endswith(MEMBER_SUFFIX)


def member_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 image as the bytes of a ``.npy`` file (readable with ``np.load``)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(pixels, dtype=np.uint8), allow_pickle=False)
    return buffer.getvalue()


def checksum(data: bytes) -> int:
    return zlib.crc32(data)


@dataclass(frozen=True)
class DecodedPack:
    """What the members of a pre-decoded pack hold."""

    crop_size: int
    image_size: Optional[int]
    color: bool

    @classmethod
    def of(cls, spec: ImageSpec) -> "DecodedPack":
        return cls(spec.crop, spec.size, spec.color)

    @classmethod
    def from_index(cls, entry: dict, where: str) -> "DecodedPack":
        try:
            pack = cls(int(entry["crop_size"]), entry["image_size"] and int(entry["image_size"]),
                       bool(entry["color"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: unreadable 'decoded' record {entry!r} ({error})") from None
        if entry.get("dtype") != "uint8" or list(entry.get("shape", [])) != list(pack.shape) \
                or entry.get("member") != "npy":
            raise ValueError(f"{where}: 'decoded' record {entry!r} is not uint8 .npy members of {pack.shape}")
        return pack

    def to_index(self) -> dict:
        return {"crop_size": self.crop_size, "image_size": self.image_size, "color": self.color,
                "shape": list(self.shape), "dtype": "uint8", "member": "npy"}

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.crop_size, self.image_size, self.color)

    @property
    def side(self) -> int:
        return self.spec.side

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    def describe(self) -> str:
        return (f"{self.side}x{self.side} {'colour' if self.color else 'grey'} uint8 "
                f"(crop_size {self.crop_size}, image_size {self.image_size or 'null'})")

    @property
    def header(self) -> bytes:
        """The exact ``.npy`` header every member starts with."""
        return member_bytes(np.zeros(self.shape, np.uint8))[: -int(np.prod(self.shape))]

    def reader(self, spec: ImageSpec, root: object) -> "PixelReader":
        """A reader giving ``spec``'s pixels from this pack's members, or ConfigError naming
        the field that asks for something the pack cannot give."""
        if spec.color != self.color:
            raise ConfigError(
                f"data.color: the shards in {root} are pre-decoded {'colour' if self.color else 'grey'} "
                f"({self.describe()}); set data.color {str(self.color).lower()}, or pack the images "
                f"again with {'--colour' if spec.color else '--grey'}")
        if spec.side > self.side:
            field = "data.image_size" if spec.size is not None else "data.crop_size"
            raise ConfigError(
                f"{field}: {spec.side}-pixel images asked for, but the shards in {root} hold "
                f"pre-decoded {self.describe()} images; allowed: a side of at most {self.side} "
                f"(data.image_size, or data.crop_size when image_size is null), or pack again")
        return PixelReader(self, spec.side)


class PixelReader:
    """Member bytes -> uint8 pixels of ``side``; picklable (worker processes get a copy)."""

    def __init__(self, pack: DecodedPack, side: int):
        self.pack, self.side = pack, side
        self.header = pack.header
        self.size = len(self.header) + int(np.prod(pack.shape))

    def __call__(self, data: bytes, name: str) -> np.ndarray:
        if len(data) != self.size or not data.startswith(self.header):
            raise BadSample(name, f"not a pre-decoded {self.pack.describe()} member "
                                  f"({len(data)} bytes; expected {self.size} with the .npy header)")
        pixels = np.frombuffer(data, np.uint8, offset=len(self.header)).reshape(self.pack.shape)
        if self.side == self.pack.side:
            return pixels
        from PIL import Image

        # Same centre square at a smaller side: resampled from the stored pixels.
        resized = Image.fromarray(pixels).resize((self.side, self.side), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)
