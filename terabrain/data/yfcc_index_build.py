"""Building the YFCC100M catalog index (`terabrain data index`): the metadata file parsed once,
in parallel, into the fixed-width columns that ``yfcc_index.YFCCIndex`` maps.

Work units: a plain file is cut into fixed 32 MiB byte blocks. Block ``k`` parses the lines
that start inside it (a line starts at byte 0 or after a ``\\n``) and hashes exactly its
block's bytes, so neither the parse nor the checksum depends on how many workers there are.
A compressed file (``.bz2``, ``.gz``) is decompressed by one reader (the formats are
sequential) which cuts the text into ~32 MiB pieces at line ends and hands them to the
workers; the checksum is then the SHA-256 of the compressed bytes.

Each unit's result is saved as ``chunk-<k>.npz`` in a work directory beside the index (local
tag and extension vocabularies, local line numbers). Assembly then maps the local
vocabularies onto the sorted global one and writes the columns unit by unit, in file order,
into a temporary file renamed over the index: the index is byte-identical whatever the
worker count. A build that is killed leaves the index absent (or the old one) and its work
directory; the next build with the same source (size and mtime unchanged) keeps the units
already done and parses only the rest.

Line semantics are those of ``yfcc.select``: text mode with universal newlines (``\\r\\n``
and a lone ``\\r`` end a line), UTF-8 with replacement, empty lines skipped but numbered.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np

from terabrain.data.yfcc_index import (
    FLAG_HASH_OK,
    FLAG_ID_OK,
    FLAG_IRREGULAR,
    HEADER_ALIGN,
    MAGIC,
    MARKER_OTHER,
    VERSION,
    YFCCIndex,
    source_identity,
)

BLOCK = 32 << 20  # bytes of source per work unit
_HEX32 = re.compile(r"[0-9a-f]{32}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_HASH_COLUMN_25, _ID_COLUMN_25, _ID_COLUMN_23 = 2, 1, 0
_TAGS_25, _TAGS_23, _EXT_25, _EXT_23 = 10, 8, 23, 21


# --- parsing one unit ---------------------------------------------------------------------

class _Unit:
    """Columns of the records of one work unit, in local numbering."""

    def __init__(self):
        self.marker = bytearray()
        self.flags = bytearray()
        self.ids = array("Q")
        self.hashes = bytearray()
        self.ext = array("I")
        self.tag_counts = array("I")
        self.tags = array("I")
        self.tag_vocab: dict[str, int] = {}
        self.ext_vocab: dict[str, int] = {}
        self.irregular_records = array("Q")
        self.irregular_text: list[str] = []  # per irregular record: normalized hash, id path
        self.odd_records = array("Q")
        self.odd_lines = array("Q")
        self.bad_lines = array("Q")
        self.bad_columns = array("Q")
        self.lines = 0
        self._tag_cache: dict[str, str | None] = {}

    def parse(self, text: str) -> None:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        tag_cache, tag_vocab, ext_vocab = self._tag_cache, self.tag_vocab, self.ext_vocab
        for number, line in enumerate(lines, self.lines + 1):
            if not line:
                continue
            fields = line.split("\t")
            width = len(fields)
            if width == 25:
                digest = fields[_HASH_COLUMN_25].strip().lower()
                identifier, tag_field, extension = fields[_ID_COLUMN_25], fields[_TAGS_25], fields[_EXT_25]
            elif width == 23:
                digest = None
                identifier, tag_field, extension = fields[_ID_COLUMN_23], fields[_TAGS_23], fields[_EXT_23]
            else:
                self.bad_lines.append(number)
                self.bad_columns.append(width)
                continue
            record = len(self.marker)
            marker = fields[-1].strip()
            self.marker.append(0 if marker == "0" else 1 if marker == "1" else MARKER_OTHER)
            # Tags as yfcc.parse_tags reads them, sorted so that ids are in vocabulary order.
            tags = set()
            for raw in tag_field.split(","):
                tag = tag_cache.get(raw, False)
                if tag is False:  # None: a blank entry, which parse_tags leaves out
                    tag = tag_cache[raw] = unquote_plus(raw).strip().lower() if raw.strip() else None
                if tag is not None:
                    tags.add(tag)
            for tag in sorted(tags):
                local = tag_vocab.get(tag)
                if local is None:
                    local = tag_vocab[tag] = len(tag_vocab)
                self.tags.append(local)
            self.tag_counts.append(len(tags))
            # The two image-path layouts, valid as yfcc._relative_path decides.
            flags = 0
            hash_ok = digest is not None and len(digest) >= 6 and digest.isalnum()
            identifier = identifier.strip()
            extension = (extension or "jpg").strip().lower() or "jpg"
            id_ok = identifier.isdigit() and extension.isalnum()
            flags |= FLAG_HASH_OK if hash_ok else 0
            flags |= FLAG_ID_OK if id_ok else 0
            regular_hash = not hash_ok or _HEX32.fullmatch(digest) is not None
            regular_id = not id_ok or (_DECIMAL.fullmatch(identifier) is not None and int(identifier) < 1 << 64)
            if regular_hash and regular_id:
                self.hashes += bytes.fromhex(digest) if hash_ok else bytes(16)
                self.ids.append(int(identifier) if id_ok else 0)
            else:  # kept as text: fixed-width columns cannot hold it
                flags |= FLAG_IRREGULAR
                self.hashes += bytes(16)
                self.ids.append(0)
                self.irregular_records.append(record)
                self.irregular_text += [digest if hash_ok else "", f"{identifier}.{extension}" if id_ok else ""]
            local_ext = ext_vocab.get(extension)
            if local_ext is None:
                local_ext = ext_vocab[extension] = len(ext_vocab)
            self.ext.append(local_ext if id_ok else 0)
            self.flags.append(flags)
            if not (hash_ok and id_ok):
                self.odd_records.append(record)
                self.odd_lines.append(number)
        self.lines += len(lines)

    def save(self, path: Path, digest: bytes) -> None:
        temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(temporary, "wb") as stream:
            np.savez(
                stream, marker=np.frombuffer(bytes(self.marker), np.uint8),
                flags=np.frombuffer(bytes(self.flags), np.uint8),
                ids=np.asarray(self.ids, np.uint64), hashes=np.frombuffer(bytes(self.hashes), np.uint8).reshape(-1, 16),
                ext=np.asarray(self.ext, np.uint32), tag_counts=np.asarray(self.tag_counts, np.uint32),
                tags=np.asarray(self.tags, np.uint32), tag_vocab=_strings(self.tag_vocab),
                ext_vocab=_strings(self.ext_vocab),
                irregular_records=np.asarray(self.irregular_records, np.uint64),
                irregular_text=np.array(self.irregular_text, dtype=object).astype(str)
                if self.irregular_text else np.zeros(0, "<U1"),
                odd_records=np.asarray(self.odd_records, np.uint64), odd_lines=np.asarray(self.odd_lines, np.uint64),
                bad_lines=np.asarray(self.bad_lines, np.uint64), bad_columns=np.asarray(self.bad_columns, np.uint64),
                lines=np.uint64(self.lines), digest=np.frombuffer(digest, np.uint8),
            )
        os.replace(temporary, path)


def _strings(vocabulary: dict[str, int]) -> np.ndarray:
    words = sorted(vocabulary, key=vocabulary.__getitem__)
    return np.array(words, dtype=str) if words else np.zeros(0, "<U1")


def _line_start_at_or_after(stream, position: int, size: int) -> int:
    """The first byte at or after ``position`` that begins a line (0, or after a \\n)."""
    if position <= 0:
        return 0
    stream.seek(position - 1)
    while position <= size:
        piece = stream.read(1 << 16)
        if not piece:
            return size
        found = piece.find(b"\n")
        if found >= 0:
            return position + found
        position += len(piece)
    return size


def _parse_block(job: tuple[str, int, int, int, str]) -> int:
    """Work unit ``k`` of a plain file: hash its block, parse the lines starting in it."""
    source, k, size, length, out = job  # the block length travels with the job
    first, last = k * length, (k + 1) * length
    with open(source, "rb") as stream:
        begin = _line_start_at_or_after(stream, first, size)
        end = _line_start_at_or_after(stream, last, size) if last < size else size
        stream.seek(first)
        block = stream.read(min(length, size - first))
        digest = hashlib.sha256(block).digest()
        if end > last:  # the last line runs past the block
            stream.seek(last)
            block += stream.read(end - last)
    unit = _Unit()
    unit.parse(block[begin - first : end - first].decode("utf-8", errors="replace"))
    unit.save(Path(out), digest)
    return k


def _parse_text(job: tuple[bytes, str]) -> None:
    text, out = job
    unit = _Unit()
    unit.parse(text.decode("utf-8", errors="replace"))
    unit.save(Path(out), b"")


# --- the build ------------------------------------------------------------------------------

def default_index_path(metadata: Path, directory: Path | None = None) -> Path:
    """``<metadata>.tbindex`` beside the file, or in ``directory``."""
    metadata = Path(metadata)
    return (Path(directory) if directory is not None else metadata.parent) / f"{metadata.name}.tbindex"


def build_index(metadata: Path, index: Path, workers: int = 1, log=None) -> Path:
    """Parse ``metadata`` into ``index`` (written atomically); returns ``index``."""
    metadata, index = Path(metadata), Path(index)
    identity = source_identity(metadata)
    work = index.with_name(f".{index.name}.building-{socket.gethostname()}")
    manifest = work / "source.json"
    if work.exists():
        try:
            same = json.loads(manifest.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(identity))
    began = time.monotonic()
    compressed = metadata.suffix in (".bz2", ".gz")
    if compressed:
        units, checksum = _parse_compressed(metadata, work, workers)
    else:
        units, checksum = _parse_plain(metadata, work, identity["size"], workers)
    if log is not None:
        log(f"parsed {metadata} in {time.monotonic() - began:.1f} s ({units} units, {workers} worker(s))")
    identity["checksum"] = checksum
    _assemble(work, units, index, identity)
    shutil.rmtree(work, ignore_errors=True)
    return index


def _chunk(work: Path, k: int) -> Path:
    return work / f"chunk-{k:06d}.npz"


def _pool(workers: int):
    # forkserver: no copy of the caller's threads (torch's, the loader's) in the workers.
    return multiprocessing.get_context("forkserver").Pool(workers)


def _parse_plain(metadata: Path, work: Path, size: int, workers: int) -> tuple[int, str]:
    units = max(1, -(-size // BLOCK))
    jobs = [(str(metadata), k, size, BLOCK, str(_chunk(work, k))) for k in range(units) if not _chunk(work, k).exists()]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _parse_block(job)
    else:
        with _pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_parse_block, jobs):
                pass
    digests = hashlib.sha256()
    for k in range(units):
        with np.load(_chunk(work, k)) as chunk:
            digests.update(chunk["digest"].tobytes())
    return units, f"sha256-of-32MiB-blocks:{digests.hexdigest()}"


class _HashingReader:
    """A binary file that hashes what the decompressor reads from it."""

    def __init__(self, stream):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, size=-1):
        data = self.stream.read(size)
        self.sha.update(data)
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self):
        return True

    def close(self):
        self.stream.close()

    @property
    def closed(self):
        return self.stream.closed

    def __getattr__(self, name):  # seekable(), tell(), ... of the underlying file
        return getattr(self.stream, name)


def _text_pieces(metadata: Path, hashing: _HashingReader) -> Iterator[bytes]:
    """The decompressed text in pieces of about BLOCK bytes that end at a line end."""
    opener = bz2.open if metadata.suffix == ".bz2" else gzip.open
    with opener(hashing, "rb") as stream:
        rest = b""
        while True:
            data = stream.read(BLOCK)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            yield data[:cut]
            rest = data[cut:]
        if rest:
            yield rest
    while hashing.read(1 << 20):  # trailing bytes after the compressed stream, if any
        pass


def _parse_compressed(metadata: Path, work: Path, workers: int) -> tuple[int, str]:
    hashing = _HashingReader(open(metadata, "rb"))  # noqa: SIM115 (closed below, after the decompressor)
    try:
        jobs = ((piece, str(_chunk(work, k))) for k, piece in enumerate(_text_pieces(metadata, hashing)))
        units = 0
        if workers <= 1:
            for piece, out in jobs:
                if not Path(out).exists():
                    _parse_text((piece, out))
                units += 1
        else:
            with _pool(workers) as pool:
                pending = []
                for piece, out in jobs:
                    units += 1
                    if Path(out).exists():
                        continue
                    pending.append(pool.apply_async(_parse_text, ((piece, out),)))
                    while len(pending) >= 2 * workers:  # bound the text held in memory
                        pending.pop(0).get()
                for result in pending:
                    result.get()
    finally:
        hashing.close()
    if units == 0:  # an empty file still gets one (empty) unit
        _Unit().save(_chunk(work, 0), b"")
        units = 1
    return units, f"sha256:{hashing.sha.hexdigest()}"


# --- assembly -------------------------------------------------------------------------------

_FIXED = (  # name, dtype, per-record shape
    ("marker", np.uint8, ()), ("flags", np.uint8, ()), ("photo_id", np.uint64, ()),
    ("hash", np.uint8, (16,)), ("ext", np.uint16, ()),
)


def _assemble(work: Path, units: int, index: Path, identity: dict) -> None:
    tag_words: set[str] = set()
    ext_words: set[str] = set()
    counts = {"records": 0, "tags": 0, "irregular": 0, "odd": 0, "bad": 0, "lines": 0}
    for k in range(units):
        with np.load(_chunk(work, k)) as chunk:
            tag_words.update(chunk["tag_vocab"].tolist())
            ext_words.update(chunk["ext_vocab"].tolist())
            counts["records"] += len(chunk["marker"])
            counts["tags"] += len(chunk["tags"])
            counts["irregular"] += len(chunk["irregular_records"])
            counts["odd"] += len(chunk["odd_records"])
            counts["bad"] += len(chunk["bad_lines"])
    tag_vocab = sorted(tag_words)
    ext_vocab = sorted(ext_words)
    if len(ext_vocab) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(ext_vocab)} distinct file extensions; the index holds at most 65535")
    tag_id = {word: i for i, word in enumerate(tag_vocab)}
    ext_id = {word: i for i, word in enumerate(ext_vocab)}
    n = counts["records"]
    tag_blob, tag_offsets = _pack(tag_vocab)
    ext_blob, ext_offsets = _pack(ext_vocab)
    sizes = {
        "marker": (np.uint8, (n,)), "flags": (np.uint8, (n,)), "photo_id": (np.uint64, (n,)),
        "hash": (np.uint8, (n, 16)), "ext": (np.uint16, (n,)), "tag_offsets": (np.uint64, (n + 1,)),
        "tag_ids": (np.uint32, (counts["tags"],)), "vocab_offsets": (np.uint64, (len(tag_offsets),)),
        "vocab_blob": (np.uint8, (len(tag_blob),)), "ext_offsets": (np.uint64, (len(ext_offsets),)),
        "ext_blob": (np.uint8, (len(ext_blob),)), "irregular_records": (np.uint64, (counts["irregular"],)),
        "odd_records": (np.uint64, (counts["odd"],)), "odd_lines": (np.uint64, (counts["odd"],)),
        "bad_lines": (np.uint64, (counts["bad"],)), "bad_columns": (np.uint64, (counts["bad"],)),
    }
    irregular_text: list[str] = []
    for k in range(units):  # irregular records are rare: their text is packed in memory
        with np.load(_chunk(work, k)) as chunk:
            irregular_text += chunk["irregular_text"].tolist()
    irregular_blob, irregular_offsets = _pack(irregular_text)
    sizes["irregular_offsets"] = (np.uint64, (len(irregular_offsets),))
    sizes["irregular_blob"] = (np.uint8, (len(irregular_blob),))
    sections, position = {}, 0
    for name, (dtype, shape) in sizes.items():
        sections[name] = {"offset": position, "dtype": np.dtype(dtype).str, "shape": list(shape)}
        position += _aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    header = {
        "format": "terabrain-yfcc-index", "version": VERSION, "source": identity,
        "records": n, "tags": len(tag_vocab), "extensions": len(ext_vocab), "sections": sections,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    base = _aligned(len(MAGIC) + 8 + len(header_bytes))
    temporary = index.with_name(f".{index.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            out.write(MAGIC + len(header_bytes).to_bytes(8, "little") + header_bytes)
            out.truncate(base + position)

            def put(name: str, start: int, values: np.ndarray) -> None:
                spec = sections[name]
                itemsize = np.dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"][1:] or [1]))
                out.seek(base + spec["offset"] + start * itemsize)
                out.write(np.ascontiguousarray(values, dtype=spec["dtype"]).tobytes())

            put("vocab_offsets", 0, tag_offsets)
            put("vocab_blob", 0, tag_blob)
            put("ext_offsets", 0, ext_offsets)
            put("ext_blob", 0, ext_blob)
            put("irregular_offsets", 0, irregular_offsets)
            put("irregular_blob", 0, irregular_blob)
            record = tag_position = odd = bad = irregular = line = 0
            put("tag_offsets", 0, np.zeros(1, np.uint64))
            for k in range(units):
                with np.load(_chunk(work, k)) as chunk:
                    m = len(chunk["marker"])
                    for name, _, _ in _FIXED:
                        if name == "ext":
                            remap = np.array([ext_id[w] for w in chunk["ext_vocab"].tolist()] or [0], np.uint16)
                            put("ext", record, remap[chunk["ext"]])
                        else:
                            put(name, record, chunk[{"photo_id": "ids", "hash": "hashes"}.get(name, name)])
                    remap = np.array([tag_id[w] for w in chunk["tag_vocab"].tolist()] or [0], np.uint32)
                    tags = remap[chunk["tags"]]
                    put("tag_ids", tag_position, tags)
                    put("tag_offsets", record + 1, tag_position + np.cumsum(chunk["tag_counts"], dtype=np.uint64))
                    tag_position += len(tags)
                    for name, values in (("irregular_records", chunk["irregular_records"] + np.uint64(record)),):
                        put(name, irregular, values)
                    irregular += len(chunk["irregular_records"])
                    put("odd_records", odd, chunk["odd_records"] + np.uint64(record))
                    put("odd_lines", odd, chunk["odd_lines"] + np.uint64(line))
                    odd += len(chunk["odd_records"])
                    put("bad_lines", bad, chunk["bad_lines"] + np.uint64(line))
                    put("bad_columns", bad, chunk["bad_columns"])
                    bad += len(chunk["bad_lines"])
                    record += m
                    line += int(chunk["lines"])
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, index)
    finally:
        if temporary.exists():
            temporary.unlink()
    YFCCIndex(index).close()  # refuses a malformed file here rather than at training time


def _pack(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [w.encode("utf-8") for w in words]
    offsets = np.zeros(len(encoded) + 1, np.uint64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:]) if encoded else None
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


def _aligned(size: int) -> int:
    return -(-size // HEADER_ALIGN) * HEADER_ALIGN


def log_to_stderr(message: str) -> None:
    print(f"terabrain: {message}", file=sys.stderr)


# --- training: build once per node, or reuse -----------------------------------------------

def prepare_selection(metadata: Path, index_dir: Path | None, keep, layout: str, *, builder: bool,
                      workers: int = 1, poll_s: float = 0.2) -> tuple[Path, Path]:
    """The index of ``metadata`` and the saved selection of (``keep``, ``layout``), made if
    missing or stale by the ``builder`` (rank 0 of each node); the other ranks of the node
    wait for them. Returns (index path, selection path)."""
    from terabrain.data.yfcc_index import matches, selection_path, write_selection

    index_path = default_index_path(metadata, index_dir)
    failed = index_path.with_name(f".{index_path.name}.failed-{socket.gethostname()}")
    if builder:
        failed.unlink(missing_ok=True)
        try:
            index = _open_matching(index_path, metadata, matches)
            if index is None:
                log_to_stderr(f"building the catalog index {index_path} of {metadata} "
                              f"({workers} worker(s); once, reused while the file is unchanged)")
                began = time.monotonic()
                build_index(metadata, index_path, workers, log=log_to_stderr)
                log_to_stderr(f"index built in {time.monotonic() - began:.1f} s")
                index = YFCCIndex(index_path)
            try:
                selection = selection_path(index, keep, layout)
                if not selection.exists():
                    write_selection(index, keep, layout)
            finally:
                index.close()
        except BaseException as error:
            failed.write_text(f"{type(error).__name__}: {error}")
            raise
        return index_path, selection
    began = time.time()
    while True:
        if failed.exists() and failed.stat().st_mtime >= began - 1:
            raise RuntimeError(f"the local rank 0 failed to build {index_path}: {failed.read_text()}")
        index = _open_matching(index_path, metadata, matches)
        if index is not None:
            selection = selection_path(index, keep, layout)
            index.close()
            if selection.exists():
                return index_path, selection
        time.sleep(poll_s)


def _open_matching(index_path: Path, metadata: Path, matches) -> YFCCIndex | None:
    if not index_path.exists():
        return None
    try:
        index = YFCCIndex(index_path)
    except ValueError:
        return None  # another version, or damaged: rebuilt
    if matches(index, metadata):
        return index
    index.close()
    return None
