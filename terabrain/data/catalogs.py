"""Catalogs: the numbered list of raw examples in a collection, and how to read the bytes of
example ``i``. One per kind of collection: an image folder, tar shards, a YFCC100M metadata
file plus an image root. Catalogs are cheap to pickle (worker processes get a copy) and
safe to read from many threads at once (``os.pread`` on cached descriptors).

``problems`` lists what was refused or unusable while building the catalog (non-image
files, ``..`` members, truncated shards ...): the loader counts them and reports them.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from terabrain.data.decode import BadSample, is_image_name
from terabrain.data.packed_strings import PackedStrings
from terabrain.data.predecoded import DecodedPack, checksum
from terabrain.data.shards import load_pack
from terabrain.data.yfcc import YFCCFilter, select
from terabrain.data.yfcc_index import IndexProblems, YFCCIndex, open_selection

# data.max_file_bytes' default: a photograph is a few MB; a larger "image" is damaged or not
# an image, and reading it whole could exhaust memory.
DEFAULT_MAX_FILE_BYTES = 64 * 2**20


class Catalog:
    problems: list[tuple[str, str]]
    decoded: Optional[DecodedPack] = None  # members hold pre-decoded pixels, not image files
    max_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files or members are unreadable examples

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> bytes:
        raise NotImplementedError


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def _not_regular(mode: int) -> str:
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return f"not a regular file ({kind})"


def _too_large(size: int, limit: int) -> str:
    return f"{size} bytes, more than data.max_file_bytes = {limit}"


def read_regular_file(path: Path, name: str, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; BadSample
    otherwise. Opened non-blocking, so a FIFO (which would wait for a writer forever) or a
    device (``/dev/zero`` never ends) is refused after the open instead of read; a symlink
    to a regular file is fine."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise BadSample(name, f"unreadable file ({error.strerror or error})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise BadSample(name, _not_regular(info.st_mode))
        if info.st_size > limit:
            raise BadSample(name, _too_large(info.st_size, limit))
        chunks, total = [], 0
        while True:  # never more than limit + 1 bytes, even if the file grows meanwhile
            block = os.read(descriptor, min(1 << 20, limit + 1 - total))
            if not block:
                return b"".join(chunks)
            chunks.append(block)
            total += len(block)
            if total > limit:
                raise BadSample(name, _too_large(total, limit))
    except OSError as error:
        raise BadSample(name, f"unreadable file ({error.strerror or error})") from None
    finally:
        os.close(descriptor)


class FolderCatalog(Catalog):
    """Every image file under ``root`` (recursively, sorted, hidden files left out). Files
    whose name is not an image's are listed in ``problems`` and not used. The relative paths
    are packed (``PackedStrings``: text plus a 4-byte offset per image, not one Python string
    each); ``name``/``read`` decode one on demand."""

    paths: PackedStrings

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        paths: list[str] = []
        self.problems = []
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            relative = os.path.relpath(directory, self.root)
            for file in sorted(files):
                if file.startswith("."):
                    continue
                path = file if relative == "." else f"{relative}/{file}"
                if is_image_name(file):
                    paths.append(path)
                else:
                    self.problems.append((str(self.root / path), "not an image (file name extension)"))
        paths.sort()
        self.paths = PackedStrings(paths)

    @classmethod
    def from_paths(cls, root: Path, paths: Iterable[str], problems: Iterable[tuple[str, str]] = (),
                   max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> FolderCatalog:
        """A catalog of the given relative paths under ``root``, in the given order, without
        listing the folder (a saved listing; tests and benchmarks)."""
        catalog = cls.__new__(cls)
        catalog.root, catalog.max_bytes = Path(root), max_bytes
        catalog.paths, catalog.problems = PackedStrings(paths), list(problems)
        return catalog

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def read(self, index: int) -> bytes:
        path = self.root / self.paths[index]
        return read_regular_file(path, str(path), self.max_bytes)


class YFCCCatalog(FolderCatalog):
    """The images a YFCC100M metadata file names (after filtering), under an image root.
    A listed image missing from the root is an unreadable example (skipped and counted)."""

    def __init__(self, metadata: Path, root: Path, keep: YFCCFilter, layout: str,
                 max_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        paths, self.problems = select(Path(metadata), keep, layout)
        self.paths = PackedStrings(paths)


class IndexedYFCCCatalog(Catalog):
    """The images of a saved selection of a YFCC100M index (``terabrain data index``): the
    index and the selection are memory maps, so a rank holds only the pages it touches and
    every rank of a node shares them; nothing is parsed or listed at start-up."""

    def __init__(self, index: Path, selection: Path, root: Path, layout: str, metadata_name: str,
                 max_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.max_bytes = max_bytes
        self.index_path, self.selection_path = Path(index), Path(selection)
        self.root, self.layout, self.metadata_name = Path(root), layout, metadata_name
        self._open()

    def _open(self) -> None:
        self.index = YFCCIndex(self.index_path)
        self.records, pathless = open_selection(self.selection_path)
        self.problems = IndexProblems(self.index, pathless, self.metadata_name)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("index", "records", "problems")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.records)

    def name(self, index: int) -> str:
        return str(self.root / self.index.image_path(int(self.records[index]), self.layout))

    def read(self, index: int) -> bytes:
        name = self.name(index)
        return read_regular_file(Path(name), name, self.max_bytes)


class ShardCatalog(Catalog):
    """Image members of tar shards, numbered shard by shard in member order. ``locate``
    (set by staging) maps a shard to a node-local copy once one is complete and verified.
    Members with a CRC-32 in the index (pre-decoded packs) are checked on every read."""

    def __init__(self, location: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.location = Path(location)
        self.max_bytes = max_bytes
        self.tables, self.decoded = load_pack(self.location)
        for table in self.tables:
            table.freeze()
        self.problems = [problem for table in self.tables for problem in table.problems]
        counts = np.array([len(t.names) for t in self.tables], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.locate: Optional[Callable[[int], Path]] = None
        self._descriptors: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_descriptors"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def shards_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, indices, side="right") - 1

    def name(self, index: int) -> str:
        shard, member = self.shard_of(index)
        return f"{self.tables[shard].path}:{self.tables[shard].names[member]}"

    def _descriptor(self, path: Path) -> int:
        descriptor = self._descriptors.get(path)
        if descriptor is None:
            with self._lock:
                descriptor = self._descriptors.get(path)
                if descriptor is None:
                    # Non-blocking: a FIFO in place of a shard would wait for a writer forever.
                    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    mode = os.fstat(descriptor).st_mode
                    if not stat.S_ISREG(mode):
                        os.close(descriptor)
                        raise OSError(errno.EINVAL, _not_regular(mode))
                    self._descriptors[path] = descriptor
        return descriptor

    def read(self, index: int) -> bytes:
        shard, member = self.shard_of(index)
        table = self.tables[shard]
        path = self.locate(shard) if self.locate is not None else table.path
        size, offset = int(table.sizes[member]), int(table.offsets[member])
        if size > self.max_bytes:
            raise BadSample(self.name(index), _too_large(int(size), self.max_bytes))
        try:
            data = os.pread(self._descriptor(path), size, offset)
        except OSError as error:
            raise BadSample(self.name(index), f"unreadable ({error.strerror or error})") from None
        if len(data) != size:
            raise BadSample(self.name(index), f"member cut short ({len(data)} of {size} bytes)")
        if table.crc32 is not None and checksum(data) != int(table.crc32[member]):
            raise BadSample(self.name(index), "member corrupt: its CRC-32 differs from the index")
        return data

    def close(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()
