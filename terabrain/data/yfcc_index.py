"""The YFCC100M catalog index: one binary file, opened with ``mmap``, that holds per line of a
metadata file what a reader and the filters need, in fixed-width columns.

File: ``MAGIC``, the header's length (8 bytes, little-endian), a JSON header (the source's
path, size, mtime and checksum; the record count; each section's offset, dtype and shape),
then the sections, each 64-byte aligned:

    marker     uint8   per record   0 photo, 1 video, 2 anything else
    flags      uint8   per record   FLAG_HASH_OK / FLAG_ID_OK (the path of that layout is
                                    valid), FLAG_IRREGULAR (paths kept as text, below)
    photo_id   uint64  per record   the identifier (layout ``id``)
    hash       16 B    per record   the photo hash, as the 16 bytes of its 32 hex digits
    ext        uint16  per record   the extension, an id into ext_offsets / ext_blob
    tag_offsets uint64 records + 1  record r's tags are tag_ids[tag_offsets[r]:tag_offsets[r+1]]
    tag_ids    uint32               ids into the sorted vocabulary (vocab_offsets / vocab_blob)
    irregular_records, irregular_offsets, irregular_blob
                                    records whose hash is not 32 hex digits or whose identifier
                                    is not a plain decimal below 2**64: their normalized hash
                                    and ``<id>.<ext>`` path as text (rare; exact all the same)
    odd_records, odd_lines          records lacking a valid path in some layout, with their
                                    line numbers (for the problem messages select() gives)
    bad_lines, bad_columns          lines with neither 23 nor 25 columns

A record is a line with 23 or 25 columns, in file order. Filters (media, tags) are applied
when a catalog is opened (``select``); a new tag filter needs no re-parse. The selection is
cached beside the index as a ``.npy`` of record numbers (uint32), which every rank maps: the
pages are shared, and a rank's resident cost is the pages it touches.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from terabrain.data.yfcc import YFCCFilter

MAGIC = b"TBYFIDX\x01"
VERSION = 1
HEADER_ALIGN = 64
FLAG_HASH_OK, FLAG_ID_OK, FLAG_IRREGULAR = 1, 2, 4
MARKER_OTHER = 2
SCAN = 1 << 22  # records per step when a filter is evaluated
NO_PATH = "no photo hash (23-column file): use data.yfcc_layout id"  # as yfcc.select says it


def source_identity(metadata: Path) -> dict:
    """What an index records of its source to tell whether it still matches."""
    status = os.stat(metadata)
    return {"path": str(Path(metadata).resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def matches(index: YFCCIndex, metadata: Path) -> bool:
    """Whether ``index`` was built from ``metadata`` as it is now (size and mtime)."""
    now = source_identity(metadata)
    recorded = index.header["source"]
    return recorded["size"] == now["size"] and recorded["mtime_ns"] == now["mtime_ns"]


class _Words(Sequence):
    """Strings packed as UTF-8 in a blob with offsets (sorted vocabularies are bisected)."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        self.offsets, self.blob = offsets, blob

    def __len__(self) -> int:
        return max(0, len(self.offsets) - 1)

    def __getitem__(self, i: int) -> str:
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes().decode("utf-8")

    def find(self, word: str) -> int | None:
        at = bisect.bisect_left(self, word)
        return at if at < len(self) and self[at] == word else None


class YFCCIndex:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as stream:
                magic = stream.read(len(MAGIC))
                length = int.from_bytes(stream.read(8), "little")
                if magic != MAGIC:
                    raise ValueError(f"{self.path}: not a terabrain YFCC100M index")
                self.header = json.loads(stream.read(length))
                self._map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot open index {self.path}: {error}") from None
        if self.header.get("version") != VERSION:
            raise ValueError(f"{self.path}: index version {self.header.get('version')}; this terabrain "
                             f"reads version {VERSION} (rebuild it with `terabrain data index`)")
        self.base = -(-(len(MAGIC) + 8 + length) // HEADER_ALIGN) * HEADER_ALIGN
        end = self.base + max((s["offset"] + _bytes(s) for s in self.header["sections"].values()), default=0)
        if len(self._map) < end:
            raise ValueError(f"{self.path}: truncated ({len(self._map)} bytes, the header says {end})")
        self.records = int(self.header["records"])
        self.vocabulary = _Words(self["vocab_offsets"], self["vocab_blob"])
        self.extensions = _Words(self["ext_offsets"], self["ext_blob"])

    def __getitem__(self, name: str) -> np.ndarray:
        spec = self.header["sections"][name]
        return np.frombuffer(self._map, dtype=np.dtype(spec["dtype"]), count=int(np.prod(spec["shape"])),
                             offset=self.base + spec["offset"]).reshape(spec["shape"])

    @property
    def checksum(self) -> str:
        return self.header["source"]["checksum"]

    def close(self) -> None:
        self.vocabulary = self.extensions = None
        try:
            self._map.close()
        except BufferError:  # arrays still look at it; it closes when they are gone
            pass

    # --- one record -------------------------------------------------------------------------

    def image_path(self, record: int, layout: str) -> str | None:
        """The image's path under the root, as yfcc.select gives it; None if it has none."""
        flags = int(self["flags"][record])
        if not flags & (FLAG_HASH_OK if layout == "hash" else FLAG_ID_OK):
            return None
        if flags & FLAG_IRREGULAR:
            at = int(np.searchsorted(self["irregular_records"], record))
            text = _Words(self["irregular_offsets"], self["irregular_blob"])
            if layout == "id":
                return text[2 * at + 1]
            digest = text[2 * at]
        elif layout == "id":
            return f"{int(self['photo_id'][record])}.{self.extensions[int(self['ext'][record])]}"
        else:
            digest = self["hash"][record].tobytes().hex()
        return f"{digest[:3]}/{digest[3:6]}/{digest}.jpg"

    def tags(self, record: int) -> set[str]:
        offsets = self["tag_offsets"]
        return {self.vocabulary[int(t)] for t in self["tag_ids"][int(offsets[record]) : int(offsets[record + 1])]}

    # --- filters ------------------------------------------------------------------------------

    def accepted(self, keep: YFCCFilter, start: int, stop: int) -> np.ndarray:
        """Which records of [start, stop) ``keep`` accepts (boolean mask)."""
        count = stop - start
        marker = self["marker"][start:stop]
        if keep.media == "any":
            mask = np.ones(count, bool)
        else:
            mask = marker == (1 if keep.media == "video" else 0)
        if not (keep.tags_any or keep.tags_all or keep.tags_none):
            return mask
        offsets = self["tag_offsets"][start : stop + 1]
        tags = self["tag_ids"][int(offsets[0]) : int(offsets[-1])]
        owner = np.repeat(np.arange(count), np.diff(offsets).astype(np.int64))

        def having(words) -> np.ndarray:
            ids = [i for i in (self.vocabulary.find(w) for w in words) if i is not None]
            found = np.zeros(count, bool)
            if ids:
                found[owner[np.isin(tags, np.array(ids, np.uint32))]] = True
            return found

        if keep.tags_any:
            mask &= having(keep.tags_any)
        for word in keep.tags_all:
            mask &= having([word])
        if keep.tags_none:
            mask &= ~having(keep.tags_none)
        return mask

    def select(self, keep: YFCCFilter, layout: str) -> tuple[np.ndarray, np.ndarray]:
        """(records ``keep`` accepts that have a path in ``layout``, in file order;
        records it accepts that have none)."""
        need = FLAG_HASH_OK if layout == "hash" else FLAG_ID_OK
        chosen, pathless = [], []
        flags = self["flags"]
        dtype = np.uint32 if self.records < 1 << 32 else np.uint64
        for start in range(0, self.records, SCAN):
            stop = min(start + SCAN, self.records)
            mask = self.accepted(keep, start, stop)
            usable = (flags[start:stop] & need) != 0
            chosen.append((np.flatnonzero(mask & usable) + start).astype(dtype))
            pathless.append((np.flatnonzero(mask & ~usable) + start).astype(np.uint64))
        if not chosen:
            return np.zeros(0, dtype), np.zeros(0, np.uint64)
        return np.concatenate(chosen), np.concatenate(pathless)


def _bytes(spec: dict) -> int:
    return int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize


def selection_key(index: YFCCIndex, keep: YFCCFilter, layout: str) -> str:
    """Names the cached selection of (index contents, filter, layout)."""
    what = json.dumps([index.checksum, index.records, keep.media, sorted(keep.tags_any), sorted(keep.tags_all),
                       sorted(keep.tags_none), layout])
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def selection_path(index: YFCCIndex, keep: YFCCFilter, layout: str) -> Path:
    return index.path.with_name(f"{index.path.name}.select-{selection_key(index, keep, layout)}.npy")


def write_selection(index: YFCCIndex, keep: YFCCFilter, layout: str) -> Path:
    """Evaluate the filter once and save the selection (records, then the path-less ones)
    atomically beside the index."""
    chosen, pathless = index.select(keep, layout)
    path = selection_path(index, keep, layout)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # nodes may share it
    with open(temporary, "wb") as stream:
        np.save(stream, chosen)
        np.save(stream, pathless)
    os.replace(temporary, path)
    return path


def open_selection(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The saved selection: its records as a memory map (nothing read beyond the header)."""
    with open(path, "rb") as stream:
        np.lib.format.read_magic(stream)
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        start = stream.tell()
        stream.seek(start + int(np.prod(shape)) * dtype.itemsize)
        pathless = np.load(stream, allow_pickle=False)
    chosen = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape) if shape[0] else np.zeros(0, dtype)
    return chosen, pathless


class IndexProblems(Sequence):
    """The unusable lines of a selection as (where, why) pairs in file order, like
    ``yfcc.select``'s list, made on demand (a 23-column file read with the hash layout has
    one per line)."""

    def __init__(self, index: YFCCIndex, pathless: np.ndarray, name: str):
        bad_lines = np.asarray(index["bad_lines"], np.uint64)
        odd = index["odd_records"]
        pathless_lines = index["odd_lines"][np.searchsorted(odd, pathless)] if len(pathless) else np.zeros(0, np.uint64)
        lines = np.concatenate([bad_lines, pathless_lines])
        self.order = np.argsort(lines, kind="stable")
        self.lines, self.columns, self.name = lines, np.asarray(index["bad_columns"]), name
        self.bad = len(bad_lines)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        at = int(self.order[i])
        where = f"{self.name}:{int(self.lines[at])}"
        if at < self.bad:
            return where, f"{int(self.columns[at])} columns; YFCC100M lines have 23 or 25"
        return where, NO_PATH
