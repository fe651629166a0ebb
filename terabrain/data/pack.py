"""``terabrain data pack SRC DEST --shard-size 1GB``: an image folder -> tar shards with an
index and checksums; ``terabrain data stats DEST``: what a collection holds and what in it
is unreadable.

Packing decodes every image first (in a pool of threads): unreadable files are listed in
the index and in the output, and left out of the shards, so a packed collection trains
without skips. Each shard is written as ``.<name>.partial``, fsynced and renamed; the index
and ``SHA256SUMS`` are written last (atomically), so a DEST with an index is complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from terabrain.data.catalogs import FolderCatalog, ShardCatalog
from terabrain.data.decode import BadSample, unreadable_reason
from terabrain.data.shards import (
    INDEX_FORMAT, INDEX_NAME, SUMS_NAME, file_sha256, read_index, scan_shard,
)
from terabrain.errors import ConfigError
from terabrain.files import fsync_dir, write_text_atomically


def check_image(data: bytes, name: str) -> tuple[int, int]:
    """Fully decode ``data``; its (width, height), or BadSample."""
    from PIL import Image

    if not data:
        raise BadSample(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except Exception as error:
        raise BadSample(name, unreadable_reason(error)) from None


@dataclass
class PackReport:
    shards: list[dict] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def _checked(catalog: FolderCatalog, index: int) -> tuple[int, Optional[bytes], Optional[BadSample]]:
    try:
        data = catalog.read(index)
        check_image(data, catalog.name(index))
        return index, data, None
    except BadSample as bad:
        return index, None, bad


def pack(source: Path, dest: Path, shard_bytes: int, workers: int = 4, log=print) -> PackReport:
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise ConfigError(f"SRC: {source} is not a directory")
    if (dest / INDEX_NAME).exists():
        raise ConfigError(f"DEST: {dest} already holds packed shards ({INDEX_NAME}); choose a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    catalog = FolderCatalog(source)
    report = PackReport(unreadable=list(catalog.problems))
    writer = _ShardWriter(dest, shard_bytes, report)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for index, data, bad in pool.map(lambda i: _checked(catalog, i), range(len(catalog))):
            if bad is not None:
                report.unreadable.append((bad.name, bad.reason))
                continue
            writer.add(catalog.paths[index], data)
    writer.finish()
    sums = "".join(f"{s['sha256']}  {s['name']}\n" for s in report.shards)
    write_text_atomically(dest / SUMS_NAME, sums)
    index = {"format": INDEX_FORMAT, "source": str(source.resolve()), "shards": report.shards,
             "unreadable": [list(u) for u in report.unreadable]}
    write_text_atomically(dest / INDEX_NAME, json.dumps(index) + "\n")
    log(f"packed {report.samples} images ({report.bytes / 1e6:.1f} MB of shards) into "
        f"{len(report.shards)} shard(s) in {dest}; {len(report.unreadable)} file(s) left out")
    for name, reason in report.unreadable[:20]:
        log(f"  left out {name}: {reason}")
    return report


class _ShardWriter:
    def __init__(self, dest: Path, limit: int, report: PackReport):
        self.dest, self.limit, self.report = dest, limit, report
        self.archive: Optional[tarfile.TarFile] = None
        self.partial: Optional[Path] = None
        self.size = 0

    def add(self, name: str, data: bytes) -> None:
        # A member costs a 512-byte header (more for long names) and padding to 512.
        cost = 1024 + len(name) + -(-len(data) // 512) * 512
        if self.archive is not None and self.size + cost > self.limit:
            self.finish()
        if self.archive is None:
            self.partial = self.dest / f".shard-{len(self.report.shards):06d}.tar.partial"
            self.archive = tarfile.open(self.partial, "w", format=tarfile.PAX_FORMAT)
            self.size = 1024
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.archive.addfile(info, io.BytesIO(data))
        self.size += cost

    def finish(self) -> None:
        if self.archive is None:
            return
        self.archive.close()
        with open(self.partial, "rb+") as stream:
            os.fsync(stream.fileno())
        final = self.dest / self.partial.name[1 : -len(".partial")]
        os.replace(self.partial, final)
        fsync_dir(self.dest)
        table = scan_shard(final)
        self.report.shards.append({
            "name": final.name, "bytes": table.bytes, "sha256": file_sha256(final),
            "members": [[n, o, s] for n, o, s in zip(table.names, table.offsets, table.sizes)],
        })
        self.report.samples += len(table.names)
        self.report.bytes += table.bytes
        self.archive = None


def stats(location: Path, verify: bool = True, decode: bool = True, workers: int = 4) -> dict:
    """Counts, sizes, image dimensions, unreadable files and checksum results of an image
    folder, a directory of shards (packed or not) or one shard."""
    location = Path(location)
    if not location.exists():
        raise ConfigError(f"DEST: {location} does not exist")
    shards = location.is_file() or read_index(location) is not None or any(location.glob("*.tar"))
    catalog = ShardCatalog(location) if shards else FolderCatalog(location)
    result: dict = {"location": str(location), "kind": "shards" if shards else "folder",
                    "samples": len(catalog)}
    unreadable = list(catalog.problems)
    if shards:
        result["shards"] = len(catalog.tables)
        result["bytes"] = sum(t.bytes for t in catalog.tables)
        result["empty_shards"] = sum(1 for t in catalog.tables if not t.names)
        result["side_members"] = sum(t.other_members for t in catalog.tables)
        index = read_index(location) if location.is_dir() else None
        if index is not None:
            result["left_out_when_packed"] = len(index.get("unreadable", []))
        if verify:
            mismatched = [str(t.path) for t in catalog.tables
                          if t.sha256 is not None and t.path.exists() and file_sha256(t.path) != t.sha256]
            result["checksums"] = {"checked": sum(1 for t in catalog.tables if t.sha256),
                                   "mismatched": mismatched}
    else:
        result["bytes"] = sum((location / p).stat().st_size for p in catalog.paths)
    widths, heights = [], []
    if decode:
        def probe(index: int):
            try:
                return check_image(catalog.read(index), catalog.name(index))
            except BadSample as bad:
                return bad

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for found in pool.map(probe, range(len(catalog))):
                if isinstance(found, BadSample):
                    unreadable.append((found.name, found.reason))
                else:
                    widths.append(found[0])
                    heights.append(found[1])
    if widths:
        result["width"] = {"min": min(widths), "median": sorted(widths)[len(widths) // 2], "max": max(widths)}
        result["height"] = {"min": min(heights), "median": sorted(heights)[len(heights) // 2], "max": max(heights)}
        result["readable"] = len(widths)
    result["unreadable"] = [{"name": n, "reason": r} for n, r in unreadable]
    return result


def format_stats(result: dict) -> str:
    lines = [f"{result['location']} ({result['kind']})",
             f"  samples       {result['samples']}",
             f"  size          {result['bytes'] / 1e6:.2f} MB"]
    if "shards" in result:
        lines.append(f"  shards        {result['shards']} ({result['empty_shards']} empty, "
                     f"{result['side_members']} non-image members)")
    if "readable" in result:
        w, h = result["width"], result["height"]
        lines.append(f"  readable      {result['readable']}, width {w['min']}..{w['max']} "
                     f"(median {w['median']}), height {h['min']}..{h['max']} (median {h['median']})")
    if "left_out_when_packed" in result:
        lines.append(f"  left out when packed  {result['left_out_when_packed']}")
    if "checksums" in result:
        c = result["checksums"]
        lines.append(f"  checksums     {c['checked']} checked, {len(c['mismatched'])} mismatched")
        lines += [f"    MISMATCH {name}" for name in c["mismatched"]]
    lines.append(f"  unreadable    {len(result['unreadable'])}")
    lines += [f"    {u['name']}: {u['reason']}" for u in result["unreadable"][:50]]
    if len(result["unreadable"]) > 50:
        lines.append(f"    ... and {len(result['unreadable']) - 50} more (--json lists all)")
    return "\n".join(lines)
