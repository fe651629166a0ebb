"""Reading DCP checkpoints without trusting them.

DCP stores its metadata with pickle and lets the metadata name any file and any byte range.
``SafeFileSystemReader`` closes each of those doors before DCP walks through them:

- the unpickler admits an explicit list of classes (DCP's metadata dataclasses, ``torch.Size``,
  torch dtypes), never "anything in module X": a module's namespace also holds what it
  imported (``filesystem.Tensor(2e11)`` would allocate 800 GB, ``filesystem.os.system`` runs
  a command);
- every storage path must name a regular file directly inside the checkpoint directory, so a
  path cannot leave it or point at a FIFO or device that would block or never end;
- every declared size is checked against the files before anything is allocated or opened:
  each chunk lies inside its tensor, the chunks cover the tensor, each chunk's byte range
  lies inside its file and is large enough for the chunk, and all tensors together need no
  more bytes than the files hold.

Only tensors are accepted: DCP reads non-tensor entries with ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

# Larger than any metadata a real checkpoint has (a few KB per tensor); read before unpickling.
METADATA_LIMIT_BYTES = 256 * 2**20

_ALLOWED_CLASSES: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
}
_ALLOWED_CLASSES[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = (
    dcp_filesystem._StorageInfo)
_ALLOWED_CLASSES.update({
    ("torch", "Size"): torch.Size,
    ("torch", "strided"): torch.strided,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): Path,
    ("collections", "OrderedDict"): collections.OrderedDict,
})


class CheckpointRefused(pickle.UnpicklingError):
    """A checkpoint that is damaged or was not written by terabrain; the message says why."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_CLASSES.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointRefused(
            f"checkpoint metadata refers to {module[:80]}.{name[:80]}, which a checkpoint never "
            "contains; refusing to load it"
        )


def regular_file_size(path: Path) -> int:
    """The size of ``path`` if it is a regular file (not a link, FIFO or device)."""
    try:
        info = os.lstat(path)
    except OSError as error:
        raise CheckpointRefused(f"{path.name}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointRefused(f"{path.name} is not a regular file")
    return info.st_size


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. Opened without following
    links and without blocking, so a FIFO swapped in after the check cannot hang the read."""
    size = regular_file_size(path)
    if size > limit:
        raise CheckpointRefused(f"{path.name} holds {size} bytes, more than the {limit} allowed")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointRefused(f"{path.name} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return stream.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def _storage_file(directory: Path, relative: Any) -> Path:
    """The file a storage entry names; only plain names inside ``directory`` are allowed."""
    if not isinstance(relative, str) or not relative or relative != os.path.basename(relative) \
            or relative in (".", "..") or "\x00" in relative:
        raise CheckpointRefused(
            f"checkpoint storage path {str(relative)[:80]!r} is outside the checkpoint directory")
    return directory / relative


def _dims(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > 64 or not all(
            type(v) is int and v >= 0 for v in values):
        raise CheckpointRefused(f"checkpoint entry {what} declares an invalid shape")
    return tuple(values)


def check_declared_sizes(directory: Path, metadata: Metadata) -> None:
    """Every declared size and offset against the files in ``directory``; see the module
    docstring. Nothing is allocated and no data file is opened."""
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise CheckpointRefused("checkpoint metadata is malformed")
    file_sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not isinstance(info, dcp_filesystem._StorageInfo):
            raise CheckpointRefused("checkpoint storage entry is malformed")
        path = _storage_file(directory, info.relative_path)
        if info.relative_path not in file_sizes:
            file_sizes[info.relative_path] = regular_file_size(path)
        offset, length = info.offset, info.length
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 \
                or offset + length > file_sizes[info.relative_path]:
            raise CheckpointRefused(
                f"checkpoint entry {str(getattr(index, 'fqn', '?'))[:80]} declares bytes "
                f"{offset}..{offset}+{length} of {info.relative_path}, which holds "
                f"{file_sizes[info.relative_path]} bytes")
    available = sum(file_sizes.values())
    needed = 0
    for key, entry in metadata.state_dict_metadata.items():
        name = str(key)[:80]
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointRefused(
                f"checkpoint entry {name!r} is not a tensor; terabrain checkpoints hold "
                "tensors only, refusing to load it")
        dtype = getattr(entry.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointRefused(f"checkpoint entry {name} has no valid dtype")
        size = _dims(entry.size, name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        covered = 0
        for chunk in entry.chunks:
            offsets, lengths = _dims(chunk.offsets, name), _dims(chunk.sizes, name)
            if len(offsets) != len(size) or len(lengths) != len(size) or any(
                    o + n > s for o, n, s in zip(offsets, lengths, size)):
                raise CheckpointRefused(f"checkpoint entry {name} has a chunk outside its shape")
            info = metadata.storage_data.get(dcp_metadata.MetadataIndex(key, torch.Size(offsets)))
            if info is None:
                raise CheckpointRefused(f"checkpoint entry {name} has a chunk with no storage")
            chunk_bytes = math.prod(lengths) * itemsize
            if chunk_bytes > info.length:
                raise CheckpointRefused(
                    f"checkpoint entry {name} declares {chunk_bytes} bytes in a chunk stored "
                    f"in {info.length} bytes")
            covered += math.prod(lengths)
        if covered != math.prod(size):
            raise CheckpointRefused(
                f"checkpoint entry {name}'s chunks cover {covered} of {math.prod(size)} elements")
        needed += math.prod(size) * itemsize
        if needed > available:
            raise CheckpointRefused(
                f"checkpoint declares at least {needed} bytes of tensors (up to {name}) but its "
                f"files hold {available} bytes")


class SafeFileSystemReader(dcp.FileSystemReader):
    """A DCP reader that never unpickles arbitrary objects and checks what the metadata
    declares before DCP acts on it."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        directory = Path(self.path)
        rank = kwargs.get("rank")
        data = read_regular_file(Path(self._get_metadata_path(rank)), METADATA_LIMIT_BYTES)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except CheckpointRefused:
            raise
        except Exception as error:  # noqa: BLE001 (a damaged pickle raises any of a dozen types)
            raise CheckpointRefused(
                f"checkpoint metadata is damaged ({type(error).__name__})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointRefused("checkpoint metadata is not DCP metadata")
        check_declared_sizes(directory, metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
