"""Catalogs: the numbered list of raw examples in a collection, and how to read the bytes of
example ``i``. One per kind of collection: an image folder, tar shards, a YFCC100M metadata
file plus an image root. Catalogs are cheap to pickle (worker processes get a copy) and
safe to read from many threads at once (``os.pread`` on cached descriptors).

``problems`` lists what was refused or unusable while building the catalog (non-image
files, ``..`` members, truncated shards ...): the loader counts them and reports them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from terabrain.data.decode import BadSample, is_image_name
from terabrain.data.predecoded import DecodedPack, checksum
from terabrain.data.shards import ShardTable, load_pack
from terabrain.data.yfcc import YFCCFilter, select
from terabrain.data.yfcc_index import IndexProblems, YFCCIndex, open_selection


class Catalog:
    problems: list[tuple[str, str]]
    decoded: Optional[DecodedPack] = None  # members hold pre-decoded pixels, not image files

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> bytes:
        raise NotImplementedError


def _read_file(path: Path, name: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise BadSample(name, f"unreadable file ({error.strerror or error})") from None


class FolderCatalog(Catalog):
    """Every image file under ``root`` (recursively, sorted, hidden files left out). Files
    whose name is not an image's are listed in ``problems`` and not used."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.paths: list[str] = []
        self.problems = []
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            relative = os.path.relpath(directory, self.root)
            for file in sorted(files):
                if file.startswith("."):
                    continue
                path = file if relative == "." else f"{relative}/{file}"
                if is_image_name(file):
                    self.paths.append(path)
                else:
                    self.problems.append((str(self.root / path), "not an image (file name extension)"))
        self.paths.sort()

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def read(self, index: int) -> bytes:
        return _read_file(self.root / self.paths[index], self.name(index))


class YFCCCatalog(FolderCatalog):
    """The images a YFCC100M metadata file names (after filtering), under an image root.
    A listed image missing from the root is an unreadable example (skipped and counted)."""

    def __init__(self, metadata: Path, root: Path, keep: YFCCFilter, layout: str):
        self.root = Path(root)
        self.paths, self.problems = select(Path(metadata), keep, layout)


class IndexedYFCCCatalog(Catalog):
    """The images of a saved selection of a YFCC100M index (``terabrain data index``): the
    index and the selection are memory maps, so a rank holds only the pages it touches and
    every rank of a node shares them; nothing is parsed or listed at start-up."""

    def __init__(self, index: Path, selection: Path, root: Path, layout: str, metadata_name: str):
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
        return _read_file(Path(name), name)


class ShardCatalog(Catalog):
    """Image members of tar shards, numbered shard by shard in member order. ``locate``
    (set by staging) maps a shard to a node-local copy once one is complete and verified.
    Members with a CRC-32 in the index (pre-decoded packs) are checked on every read."""

    def __init__(self, location: Path):
        self.location = Path(location)
        self.tables, self.decoded = load_pack(self.location)
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
                    descriptor = self._descriptors[path] = os.open(path, os.O_RDONLY)
        return descriptor

    def read(self, index: int) -> bytes:
        shard, member = self.shard_of(index)
        table = self.tables[shard]
        path = self.locate(shard) if self.locate is not None else table.path
        size, offset = table.sizes[member], table.offsets[member]
        try:
            data = os.pread(self._descriptor(path), size, offset)
        except OSError as error:
            raise BadSample(self.name(index), f"unreadable ({error.strerror or error})") from None
        if len(data) != size:
            raise BadSample(self.name(index), f"member cut short ({len(data)} of {size} bytes)")
        if table.crc32 is not None and checksum(data) != table.crc32[member]:
            raise BadSample(self.name(index), "member corrupt: its CRC-32 differs from the index")
        return data

    def close(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()
