"""Loading safetensors files (exports, the whitening transform) without trusting them.

The safetensors format is safe to parse (no pickle), but a damaged or crafted file still
reaches users as a Rust panic, a traceback or a giant allocation. ``load_tensors`` checks
the file against its own header first: a regular file, a header of sane length that parses
as JSON, and for every tensor a known dtype, a shape whose byte count matches its data
range, and a data range inside the file. Any problem is one line naming the file, raised as
the error class the caller chooses (ConfigError for input the user named, TrainingError for
a file the run wrote earlier).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

import torch

_HEADER_LIMIT_BYTES = 100 * 2**20  # the safetensors library's own limit
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class _Damaged(Exception):
    pass


def _check(path: Path) -> None:
    try:
        info = os.stat(path)
    except OSError as error:
        raise _Damaged(error.strerror or str(error)) from None
    if not stat.S_ISREG(info.st_mode):
        raise _Damaged("not a regular file")
    size = info.st_size
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        start = os.read(fd, 8)
        if len(start) < 8:
            raise _Damaged(f"{size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", start)
        if length < 2 or length > min(_HEADER_LIMIT_BYTES, size - 8):
            raise _Damaged(f"its header declares {length} bytes in a file of {size}")
        header = os.read(fd, length)
    finally:
        os.close(fd)
    try:
        entries = json.loads(header)
    except (ValueError, RecursionError):
        raise _Damaged("its header is not valid JSON") from None
    if not isinstance(entries, dict):
        raise _Damaged("its header is not a JSON object")
    data_bytes = size - 8 - length
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        shown = str(name)[:60]
        if not isinstance(entry, dict) or entry.get("dtype") not in _ITEM_BYTES:
            raise _Damaged(f"tensor {shown} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 64 or not all(
                type(d) is int and d >= 0 for d in shape):
            raise _Damaged(f"tensor {shown} has an invalid shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= data_bytes:
            raise _Damaged(f"tensor {shown} declares data outside the file")
        if math.prod(shape) * _ITEM_BYTES[entry["dtype"]] != offsets[1] - offsets[0]:
            raise _Damaged(f"tensor {shown}'s shape {shape[:8]} does not match its "
                           f"{offsets[1] - offsets[0]} bytes")


def load_tensors(path: Path, error: type[Exception], what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; ``error(one line)`` if it is damaged.
    ``what`` says what the file is for, e.g. "the exported model"."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    label = f"{path}" + (f" ({what})" if what else "")
    try:
        _check(Path(path))
        return load_file(str(path))
    except _Damaged as damage:
        raise error(f"{label} is damaged: {damage}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as failure:
        first = (str(failure).splitlines() or [type(failure).__name__])[0][:160]
        raise error(f"{label} cannot be read: {first}") from None


def expect_tensors(tensors: dict[str, torch.Tensor], names: dict[str, int], path: Path,
                   error: type[Exception]) -> None:
    """Each of ``names`` (name -> number of dimensions) is present with that many dimensions."""
    for name, dims in names.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.dim() != dims:
            raise error(f"{path} is damaged: it needs a {dims}-dimensional tensor {name!r}")
