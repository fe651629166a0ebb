"""The YFCC100M metadata file (tab-separated, one line per photo or video) and where each
image lies under an image root.

Two layouts exist. The original release (``yfcc100m_dataset-0`` ... ``-9``) has 23 columns;
the later one (one ``yfcc100m_dataset`` file, as on the Multimedia Commons S3 bucket) adds a
line number in front and the photo hash after the identifier, 25 columns:

    line, id, hash, user nsid, user nickname, date taken, date uploaded, capture device,
    title, description, user tags, machine tags, longitude, latitude, accuracy, page URL,
    download URL, licence name, licence URL, server id, farm id, secret, original secret,
    extension, marker (0 photo, 1 video)

Tags are comma-separated and URL-encoded (``new+york``). Images are found under the root as
``<hash[:3]>/<hash[3:6]>/<hash>.jpg`` (layout ``hash``, the Multimedia Commons mirror) or
``<id>.<extension>`` (layout ``id``).
"""

from __future__ import annotations

import bz2
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote_plus

COLUMNS_25 = (
    "line", "id", "hash", "user_nsid", "user_nickname", "date_taken", "date_uploaded",
    "capture_device", "title", "description", "user_tags", "machine_tags", "longitude",
    "latitude", "accuracy", "page_url", "download_url", "license_name", "license_url",
    "server_id", "farm_id", "secret", "secret_original", "extension", "marker",
)
COLUMNS_23 = tuple(c for c in COLUMNS_25 if c not in ("line", "hash"))


@dataclass(frozen=True)
class YFCCFilter:
    media: str = "photo"  # photo, video, any
    tags_any: tuple[str, ...] = ()
    tags_all: tuple[str, ...] = ()
    tags_none: tuple[str, ...] = ()

    def accepts(self, marker: str, tags: set[str]) -> bool:
        if self.media != "any" and marker != ("1" if self.media == "video" else "0"):
            return False
        if self.tags_any and not tags.intersection(self.tags_any):
            return False
        if self.tags_all and not tags.issuperset(self.tags_all):
            return False
        return not tags.intersection(self.tags_none)


def _open(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def parse_tags(field: str) -> set[str]:
    return {unquote_plus(tag).strip().lower() for tag in field.split(",") if tag.strip()}


def select(metadata: Path, keep: YFCCFilter, layout: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative image paths of the lines ``keep`` accepts, in file order, and the lines that
    could not be used (wrong column count, no hash for the ``hash`` layout)."""
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for number, fields in _lines(metadata):
        where = f"{metadata}:{number}"
        if len(fields) == 25:
            row = dict(zip(COLUMNS_25, fields))
        elif len(fields) == 23:
            row = dict(zip(COLUMNS_23, fields))
        else:
            problems.append((where, f"{len(fields)} columns; YFCC100M lines have 23 or 25"))
            continue
        if not keep.accepts(row["marker"].strip(), parse_tags(row["user_tags"])):
            continue
        path = _relative_path(row, layout)
        if path is None:
            problems.append((where, "no photo hash (23-column file): use data.yfcc_layout id"))
            continue
        paths.append(path)
    return paths, problems


def _lines(metadata: Path) -> Iterator[tuple[int, list[str]]]:
    with _open(metadata) as stream:
        for number, line in enumerate(stream, 1):
            line = line.rstrip("\r\n")
            if line:
                yield number, line.split("\t")


def _relative_path(row: dict[str, str], layout: str) -> str | None:
    if layout == "hash":
        digest = row.get("hash", "").strip().lower()
        if len(digest) < 6 or not digest.isalnum():
            return None
        return f"{digest[:3]}/{digest[3:6]}/{digest}.jpg"
    identifier = row["id"].strip()
    extension = (row.get("extension") or "jpg").strip().lower() or "jpg"
    if not identifier.isdigit() or not extension.isalnum():
        return None
    return f"{identifier}.{extension}"
