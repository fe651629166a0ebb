"""The manifest of a checkpoint: every file's size and SHA-256, so a restore can tell a
complete, undamaged checkpoint from a truncated or altered one before reading it.

``MANIFEST.json`` is written last, inside the ``.partial`` directory, so the atomic rename
that publishes a checkpoint covers it: a checkpoint directory either has a manifest that
describes all of its files, or it is not a complete checkpoint.

Each rank hashes the files it wrote itself (DCP names them ``__<rank>_<n>.distcp``), so
hashing costs one pass over the data spread over all ranks; rank 0 writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from terabrain.train.checkpoint_reader import (
    CheckpointRefused,
    read_regular_file,
    regular_file_size,
)

MANIFEST = "MANIFEST.json"
_FORMAT = 1
_MANIFEST_LIMIT_BYTES = 16 * 2**20
_CHUNK = 4 * 2**20
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a regular file, read in chunks without following links."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        hasher, size = hashlib.sha256(), 0
        while True:
            block = os.read(fd, _CHUNK)
            if not block:
                return size, hasher.hexdigest()
            hasher.update(block)
            size += len(block)
    finally:
        os.close(fd)


def digest_rank_files(directory: Path, rank: int) -> dict[str, tuple[int, str]]:
    """Digests of the data files that ``rank`` wrote into ``directory``."""
    found = {}
    for path in directory.iterdir():
        match = _RANK_FILE.match(path.name)
        if match and int(match.group(1)) == rank:
            found[path.name] = digest(path)
    return found


def write_manifest(directory: Path, known: dict[str, tuple[int, str]]) -> None:
    """``MANIFEST.json`` for every file in ``directory``: digests in ``known`` are used as
    given (other ranks hashed them), the rest are hashed here. Fsynced."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST:
            continue
        size, sha = known.get(path.name) or digest(path)
        files[path.name] = {"bytes": size, "sha256": sha}
    text = json.dumps({"format": _FORMAT, "files": files}, indent=1, sort_keys=True) + "\n"
    path = directory / MANIFEST
    with open(path, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def read_manifest(directory: Path) -> dict[str, tuple[int, str]]:
    """file name -> (size, sha256) as the manifest records them."""
    data = read_regular_file(directory / MANIFEST, _MANIFEST_LIMIT_BYTES)
    try:
        parsed = json.loads(data)
        files = parsed["files"]
        if parsed.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError
        entries = {}
        for name, entry in files.items():
            size, sha = entry["bytes"], entry["sha256"]
            if (name != os.path.basename(name) or name in ("", ".", "..") or type(size) is not int
                    or not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
                raise ValueError
            entries[name] = (size, sha)
        return entries
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CheckpointRefused(f"{MANIFEST} is damaged") from None


def verify(directory: Path) -> None:
    """Raises CheckpointRefused (saying which file and how) unless every file the manifest
    lists is a regular file with the recorded size and checksum. Sizes are all checked
    before any checksum is computed, so a truncation is found without reading the data."""
    if not (directory / MANIFEST).exists():
        raise CheckpointRefused(f"no {MANIFEST} (not a complete checkpoint)")
    entries = read_manifest(directory)
    if ".metadata" not in entries:
        raise CheckpointRefused(f"{MANIFEST} does not list .metadata")
    for name, (size, _) in entries.items():
        actual = regular_file_size(directory / name)
        if actual != size:
            raise CheckpointRefused(f"{name} holds {actual} bytes, the manifest says {size}")
    for name, (size, sha) in entries.items():
        try:
            actual_size, actual_sha = digest(directory / name)
        except OSError as error:
            raise CheckpointRefused(f"{name}: {error.strerror or error}") from None
        if (actual_size, actual_sha) != (size, sha):
            raise CheckpointRefused(f"{name} does not match its checksum in the manifest")
