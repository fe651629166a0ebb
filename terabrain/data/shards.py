"""WebDataset-style tar shards: reading their member table safely, and the index that
``terabrain data pack`` writes beside them.

A shard is a plain POSIX tar file; each image is one member, read by offset without
unpacking. Members whose path is absolute or contains ``..`` are refused (a shard must
never name a file outside itself), as are links and devices. A truncated shard keeps the
members that lie wholly inside the file; an empty shard has none. Each such problem is
reported, never silently dropped.

``index.json`` (written last, atomically: its presence means the pack is complete)::

    {"format": "terabrain-shards/1",
     "shards": [{"name": "shard-000000.tar", "bytes": N, "sha256": "...",
                 "members": [[name, data_offset, size], ...]}, ...],
     "unreadable": [[source_path, reason], ...]}

A pre-decoded pack (``pack --decode``) adds ``"decoded"`` (the preprocessing its ``.npy``
members hold) and, per shard, ``"crc32"``: one CRC-32 per member, checked on every read
(see ``predecoded.py``).

``SHA256SUMS`` holds the same checksums in ``sha256sum -c`` format.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from terabrain.data.decode import is_image_name
from terabrain.data.packed_strings import PackedStrings
from terabrain.data.predecoded import DecodedPack

INDEX_NAME = "index.json"
SUMS_NAME = "SHA256SUMS"
INDEX_FORMAT = "terabrain-shards/1"


@dataclass
class ShardTable:
    """The image members of one shard: names, data offsets and sizes."""

    path: Path
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    bytes: int = 0
    sha256: Optional[str] = None
    problems: list[tuple[str, str]] = field(default_factory=list)
    other_members: int = 0
    crc32: Optional[list[int]] = None  # pre-decoded packs: each member's CRC-32

    def freeze(self) -> ShardTable:
        """Pack the member columns for a long-lived catalog: names into one ``PackedStrings``,
        offsets and sizes into int64 arrays, CRC-32s into uint32 (about 20 bytes and the
        name's text per member, against some 150 as lists of Python objects)."""
        self.names = PackedStrings(self.names)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        if self.crc32 is not None:
            self.crc32 = np.asarray(self.crc32, dtype=np.uint32)
        return self


def unsafe_member_name(name: str) -> Optional[str]:
    """Why ``name`` may not be read from a shard, or None when it is fine."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path in a shard (refused)"
    parts = posixpath.normpath(name).split("/")
    if ".." in name.replace("\\", "/").split("/") or ".." in parts:
        return "path escapes the shard with '..' (refused)"
    return None


def scan_shard(path: Path, accept: Callable[[str], bool] = is_image_name) -> ShardTable:
    """Read the member table of a tar shard (headers only); members whose name ``accept``
    refuses are side files, counted but not read."""
    table = ShardTable(Path(path))
    try:
        size = table.bytes = os.path.getsize(path)
    except OSError as error:
        table.problems.append((str(path), f"unreadable shard ({error.strerror or error})"))
        return table
    if size == 0:
        table.problems.append((str(path), "empty shard (0 bytes)"))
        return table
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                label = f"{path}:{member.name}"
                why = unsafe_member_name(member.name)
                if why is not None:
                    table.problems.append((label, why))
                    continue
                if not member.isfile():
                    if not member.isdir():
                        table.problems.append((label, "not a regular file (link or device; refused)"))
                    continue
                if not accept(member.name):
                    table.other_members += 1  # WebDataset side files (.cls, .json, .txt)
                    continue
                if member.offset_data + member.size > size:
                    table.problems.append((label, "member cut short: the shard is truncated"))
                    continue
                table.names.append(member.name)
                table.offsets.append(member.offset_data)
                table.sizes.append(member.size)
    except (tarfile.TarError, EOFError, OSError) as error:
        reason = "truncated or corrupt shard" if table.names else "not a readable tar file"
        table.problems.append((str(path), f"{reason} ({error}); {len(table.names)} member(s) before it kept"))
    return table


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_index(directory: Path) -> Optional[dict]:
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        return None
    with open(path) as stream:
        index = json.load(stream)
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index


def load_tables(location: Path) -> list[ShardTable]:
    return load_pack(location)[0]


def load_pack(location: Path) -> tuple[list[ShardTable], Optional[DecodedPack]]:
    """The shards at ``location``: a directory written by ``terabrain data pack`` (its index
    is trusted while each shard's size matches it; a shard whose size differs is rescanned
    and reported), a directory of ``*.tar`` files, or one ``.tar`` file; and, for a
    pre-decoded pack, what its members hold."""
    location = Path(location)
    if location.is_file():
        return [scan_shard(location)], None
    index = read_index(location)
    if index is None:
        return [scan_shard(path) for path in sorted(location.glob("*.tar"))], None
    decoded = None
    if index.get("decoded") is not None:
        decoded = DecodedPack.from_index(index["decoded"], str(location / INDEX_NAME))
    tables = []
    for entry in index["shards"]:
        path = location / entry["name"]
        why = unsafe_member_name(entry["name"])
        if why is not None or "/" in entry["name"]:
            raise ValueError(f"{location / INDEX_NAME}: shard name {entry['name']!r} is not a plain file name")
        try:
            actual = os.path.getsize(path)
        except OSError:
            actual = -1
        if actual != entry["bytes"] and decoded is not None:
            tables.append(_members_inside(path, entry, actual))
            continue
        if actual != entry["bytes"]:
            table = scan_shard(path) if actual > 0 else ShardTable(path)
            table.problems.insert(0, (str(path), f"{actual} bytes, the index says {entry['bytes']}"
                                      if actual >= 0 else "missing shard listed in the index"))
            tables.append(table)
            continue
        table = ShardTable(path, bytes=entry["bytes"], sha256=entry["sha256"])
        for name, offset, size in entry["members"]:
            if unsafe_member_name(name) is None:
                table.names.append(name)
                table.offsets.append(int(offset))
                table.sizes.append(int(size))
            else:
                table.problems.append((f"{path}:{name}", unsafe_member_name(name)))
        if decoded is not None:
            table.crc32 = [int(c) for c, (name, _, _) in zip(entry["crc32"], entry["members"])
                           if unsafe_member_name(name) is None]
        tables.append(table)
    return tables, decoded


def _members_inside(path: Path, entry: dict, actual: int) -> ShardTable:
    """A pre-decoded shard whose size differs from the index: the members lying wholly
    inside the file are kept (each is still checked against its CRC-32 when read), the
    others reported. Without the index's checksums a rescan could not tell a member whole."""
    table = ShardTable(path, bytes=max(actual, 0), crc32=[])
    table.problems.append((str(path), f"{actual} bytes, the index says {entry['bytes']}"
                           if actual >= 0 else "missing shard listed in the index"))
    for (name, offset, size), crc in zip(entry["members"], entry["crc32"]):
        why = unsafe_member_name(name)
        if why is None and int(offset) + int(size) > actual:
            why = "member cut short: the shard is truncated"
        if why is not None:
            table.problems.append((f"{path}:{name}", why))
            continue
        table.names.append(name)
        table.offsets.append(int(offset))
        table.sizes.append(int(size))
        table.crc32.append(int(crc))
    return table
