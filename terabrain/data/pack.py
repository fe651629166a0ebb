"""``terabrain data pack SRC DEST --shard-size 1GB``: an image folder -> tar shards with an
index and checksums; ``terabrain data stats DEST``: what a collection holds and what in it
is unreadable.

Packing decodes every image first (in a pool of threads): unreadable files are listed in
the index and in the output, and left out of the shards, so a packed collection trains
without skips. Each shard is written as ``.<name>.partial``, fsynced and renamed; the index
and ``SHA256SUMS`` are written last (atomically), so a DEST with an index is complete.

With ``decode`` (``--decode``) each member is the image already decoded and preprocessed
(``<path>.npy``, uint8), and the index records the preprocessing and a CRC-32 per member
(see ``predecoded.py``): training reads pixels without decoding a JPEG.
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
from terabrain.data.decode import (
    BadSample,
    ImageSpec,
    decode_pixels,
    is_image_name,
    unreadable_reason,
)
from terabrain.data.predecoded import (
    MEMBER_SUFFIX,
    DecodedPack,
    checksum,
    is_member_name,
    member_bytes,
)
from terabrain.data.shards import (
    INDEX_FORMAT,
    INDEX_NAME,
    SUMS_NAME,
    file_sha256,
    read_index,
    scan_shard,
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


def _checked(catalog: FolderCatalog, index: int, decoded: Optional[DecodedPack],
             ) -> tuple[int, Optional[bytes], Optional[BadSample]]:
    """The member for image ``index``: its file, or its pre-decoded pixels."""
    try:
        data = catalog.read(index)
        if decoded is None:
            check_image(data, catalog.name(index))
            return index, data, None
        return index, member_bytes(decode_pixels(data, catalog.name(index), decoded.spec)), None
    except BadSample as bad:
        return index, None, bad


def _in_order(function, items: range, workers: int):
    """``function`` over ``items`` in a pool, in order, at most a few thousand in flight: a
    pool's plain ``map`` would hold every result of a large folder in memory."""
    chunk = 256 * max(1, workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(function, items[start : start + chunk])


def pack(source: Path, dest: Path, shard_bytes: int, workers: int = 4, log=print,
         decode: Optional[ImageSpec] = None) -> PackReport:
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise ConfigError(f"SRC: {source} is not a directory")
    if (dest / INDEX_NAME).exists():
        raise ConfigError(f"DEST: {dest} already holds packed shards ({INDEX_NAME}); choose a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    catalog = FolderCatalog(source)
    report = PackReport(unreadable=list(catalog.problems))
    decoded = DecodedPack.of(decode) if decode is not None else None
    writer = _ShardWriter(dest, shard_bytes, report, decoded is not None)
    suffix = MEMBER_SUFFIX if decoded is not None else ""
    for index, data, bad in _in_order(lambda i: _checked(catalog, i, decoded), range(len(catalog)), workers):
        if bad is not None:
            report.unreadable.append((bad.name, bad.reason))
            continue
        writer.add(catalog.paths[index] + suffix, data)
    writer.finish()
    sums = "".join(f"{s['sha256']}  {s['name']}\n" for s in report.shards)
    write_text_atomically(dest / SUMS_NAME, sums)
    index = {"format": INDEX_FORMAT, "source": str(source.resolve()), "shards": report.shards,
             "unreadable": [list(u) for u in report.unreadable]}
    if decoded is not None:
        index["decoded"] = decoded.to_index()
    write_text_atomically(dest / INDEX_NAME, json.dumps(index) + "\n")
    what = f"pre-decoded {decoded.describe()} images" if decoded is not None else "images"
    log(f"packed {report.samples} {what} ({report.bytes / 1e6:.1f} MB of shards) into "
        f"{len(report.shards)} shard(s) in {dest}; {len(report.unreadable)} file(s) left out")
    for name, reason in report.unreadable[:20]:
        log(f"  left out {name}: {reason}")
    return report


class _ShardWriter:
    def __init__(self, dest: Path, limit: int, report: PackReport, checksums: bool):
        self.dest, self.limit, self.report = dest, limit, report
        self.archive: Optional[tarfile.TarFile] = None
        self.partial: Optional[Path] = None
        self.size = 0
        self.checksums: Optional[list[int]] = [] if checksums else None

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
        if self.checksums is not None:
            self.checksums.append(checksum(data))

    def finish(self) -> None:
        if self.archive is None:
            return
        self.archive.close()
        with open(self.partial, "rb+") as stream:
            os.fsync(stream.fileno())
        final = self.dest / self.partial.name[1 : -len(".partial")]
        os.replace(self.partial, final)
        fsync_dir(self.dest)
        table = scan_shard(final, accept=is_member_name if self.checksums is not None else is_image_name)
        entry = {
            "name": final.name, "bytes": table.bytes, "sha256": file_sha256(final),
            "members": [[n, o, s] for n, o, s in zip(table.names, table.offsets, table.sizes)],
        }
        if self.checksums is not None:
            assert len(self.checksums) == len(table.names), "every member written is read back"
            entry["crc32"], self.checksums = self.checksums, []
        self.report.shards.append(entry)
        self.report.samples += len(table.names)
        self.report.bytes += table.bytes
        self.archive = None


def stats(location: Path, verify: bool = True, decode: bool = True, workers: int = 4) -> dict:
    """Counts, sizes, image dimensions, unreadable files and checksum results of an image
    folder, a directory of shards (packed or not, pre-decoded or not) or one shard. For a
    pre-decoded pack, "decoding" checks each member's header, size and CRC-32."""
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
        if catalog.decoded is not None:
            result["decoded"] = catalog.decoded.to_index()
        if verify:
            mismatched = [str(t.path) for t in catalog.tables
                          if t.sha256 is not None and t.path.exists() and file_sha256(t.path) != t.sha256]
            result["checksums"] = {"checked": sum(1 for t in catalog.tables if t.sha256),
                                   "mismatched": mismatched}
    else:
        result["bytes"] = sum((location / p).stat().st_size for p in catalog.paths)
    if result["samples"]:
        result["bytes_per_sample"] = result["bytes"] / result["samples"]
    widths, heights = [], []
    if decode:
        pixels = catalog.decoded.reader(catalog.decoded.spec, location) if catalog.decoded else None

        def probe(index: int):
            try:
                data = catalog.read(index)
                if pixels is None:
                    return check_image(data, catalog.name(index))
                return pixels(data, catalog.name(index)).shape[1::-1]
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
             f"  size          {result['bytes'] / 1e6:.2f} MB"
             + (f" ({result['bytes_per_sample'] / 1e3:.1f} kB per sample)" if "bytes_per_sample" in result else "")]
    if "decoded" in result:
        d = result["decoded"]
        side = "x".join(str(n) for n in d["shape"][:2])
        lines.append(f"  pre-decoded   {side} {'colour' if d['color'] else 'grey'} uint8 .npy members "
                     f"(crop_size {d['crop_size']}, image_size {d['image_size'] or 'null'}); train with "
                     f"data.color {str(d['color']).lower()} and a side of at most {d['shape'][0]}")
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
