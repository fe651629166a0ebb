"""A network's activations stored as shards: ``.npy`` files and/or ``.safetensors`` files,
each holding a (rows, width) array, read as one array of all their rows in file-name order.

Nothing is loaded when the shards are opened: a ``.npy`` shard is a memory map and a
safetensors shard is read a slice at a time (``safe_open(...).get_slice``), so a streamed run
touches only the rows of its batches, whatever the collection's size.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".safetensors")


class ShardError(ValueError):
    """A shard that cannot be read as (rows, width) numbers, or shards that disagree."""


def shard_files(path: Path) -> list[Path]:
    """``path`` itself (one shard) or the shards directly inside the directory ``path``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise ShardError(f"{path}: no .npy or .safetensors shards in this directory")
        return files
    if path.suffix not in SUFFIXES:
        raise ShardError(f"{path}: expected a .npy or .safetensors file, or a directory of them")
    if not path.is_file():
        raise ShardError(f"{path}: file not found")
    return [path]


class _SafetensorsShard:
    """One tensor of a safetensors file, sliced lazily by rows."""

    def __init__(self, path: Path, tensor: str | None):
        from safetensors import safe_open

        self.handle = safe_open(str(path), framework="np")
        names = list(self.handle.keys())
        if tensor is None:
            if len(names) != 1:
                raise ShardError(f"{path}: holds {', '.join(names) or 'no tensors'}; name the one "
                                 "to read with data.tensor")
            tensor = names[0]
        if tensor not in names:
            raise ShardError(f"{path}: no tensor {tensor!r} (it holds {', '.join(names)})")
        self.slice = self.handle.get_slice(tensor)
        self.shape = tuple(self.slice.get_shape())
        self.dtype = self.slice.get_dtype()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        return self.slice[rows]


class ActivationShards:
    """All rows of the shards as one (rows, width) array: ``len``, ``shape`` and indexing by
    one row or a slice of rows (what terabrain.data.examples.ArrayExamples and the in-memory
    loader ask)."""

    def __init__(self, path: Path, tensor: str | None = None):
        self.files = shard_files(path)
        self.shards = []
        for file in self.files:
            if file.suffix == ".npy":
                try:
                    shard = np.load(file, mmap_mode="r", allow_pickle=False)
                except (ValueError, OSError) as error:
                    raise ShardError(f"{file}: cannot read as .npy: {error}") from None
                if not np.issubdtype(shard.dtype, np.number):
                    raise ShardError(f"{file}: {shard.dtype} values, expected numbers")
            else:
                try:
                    shard = _SafetensorsShard(file, tensor)
                except ShardError:
                    raise
                except Exception as error:  # safetensors raises its own error types
                    raise ShardError(f"{file}: cannot read as safetensors: {error}") from None
            if len(shard.shape) != 2:
                raise ShardError(f"{file}: shape {tuple(shard.shape)}, expected (rows, width)")
            self.shards.append(shard)
        widths = {shard.shape[1] for shard in self.shards}
        if len(widths) != 1:
            listed = ", ".join(f"{f.name}: {s.shape[1]}" for f, s in zip(self.files, self.shards))
            raise ShardError(f"{path}: shards of different widths ({listed})")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.shape = (self.starts[-1], widths.pop())

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("shards are read in contiguous row ranges")
            return self.rows(start, stop)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        shard = bisect.bisect_right(self.starts, index) - 1
        local = index - self.starts[shard]
        return np.asarray(self.shards[shard][local:local + 1], dtype=np.float32)[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32, read shard by shard."""
        parts = []
        for shard, first in zip(self.shards, self.starts):
            low, high = max(start, first), min(stop, first + len(shard))
            if low < high:
                parts.append(np.asarray(shard[low - first:high - first], dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.float32)
