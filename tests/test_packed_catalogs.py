"""Folder and shard catalogs keep their names packed (``PackedStrings``), not as one Python
object per image: the resident cost per image is measured against a list of strings in the
same run, and the catalogs behave exactly as the list-based ones did (order, problems, names,
bytes, pickling for worker processes)."""

from __future__ import annotations

import gc
import io
import os
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from terabrain.data.catalogs import FolderCatalog, ShardCatalog, read_regular_file
from terabrain.data.decode import is_image_name
from terabrain.data.pack import pack
from terabrain.data.packed_strings import PackedStrings
from terabrain.data.shards import ShardTable


def _listed_the_old_way(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """FolderCatalog's listing as it was, with a list of str (the reference)."""
    paths, problems = [], []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        relative = os.path.relpath(directory, root)
        for file in sorted(files):
            if file.startswith("."):
                continue
            path = file if relative == "." else f"{relative}/{file}"
            if is_image_name(file):
                paths.append(path)
            else:
                problems.append((str(root / path), "not an image (file name extension)"))
    return sorted(paths), problems


def _synthetic_paths(count: int) -> list[str]:
    """ImageNet-like relative paths: ``nXXXXXXXX/nXXXXXXXX_NNNNNNN.JPEG`` (32 bytes)."""
    return [f"n{(i * 7919) % 1000:08d}/n{(i * 7919) % 1000:08d}_{i:07d}.JPEG" for i in range(count)]


def _retained(make) -> tuple[object, int]:
    """What ``make()`` returns and the bytes it keeps allocated (tracemalloc sees Python
    objects and numpy buffers alike)."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    value = make()
    gc.collect()
    return value, tracemalloc.get_traced_memory()[0] - before


def test_folder_catalog_holds_text_plus_an_offset_per_image():
    count = 200_000
    tracemalloc.start()
    try:
        as_list, list_bytes = _retained(lambda: _synthetic_paths(count))
        text = sum(len(p.encode()) for p in as_list)
        del as_list
        catalog, packed_bytes = _retained(lambda: FolderCatalog.from_paths(Path("/data"), _synthetic_paths(count)))
    finally:
        tracemalloc.stop()
    per_image, baseline = packed_bytes / count, list_bytes / count
    print(f"\npacked {per_image:.1f} B/image, list of str {baseline:.1f} B/image, "
          f"ratio {baseline / per_image:.2f}, text {text / count:.1f} B/image")
    assert len(catalog) == count
    # The design's cost: the text plus one offset (at most 8 bytes) per image; no copy kept.
    assert packed_bytes <= text + 8 * count
    assert per_image <= 40 and per_image < baseline / 2
    assert catalog.name(count - 1) == f"/data/{_synthetic_paths(count)[-1]}"


def test_frozen_shard_table_holds_text_plus_three_numbers_per_member():
    count = 200_000

    def table() -> ShardTable:
        made = ShardTable(Path("/shards/s.tar"))
        for i, name in enumerate(_synthetic_paths(count)):
            made.names.append(name)
            made.offsets.append(10**9 + 1536 * i)  # past 2**30: not Python's cached small ints
            made.sizes.append(100_000 + i)
        return made

    tracemalloc.start()
    try:
        _, list_bytes = _retained(table)
        frozen, frozen_bytes = _retained(lambda: table().freeze())
    finally:
        tracemalloc.stop()
    text = sum(len(p.encode()) for p in _synthetic_paths(count))
    print(f"\nfrozen {frozen_bytes / count:.1f} B/member, lists {list_bytes / count:.1f} B/member")
    # Text, a name offset (<= 8), a data offset and a size (8 each); no list kept beside them.
    assert frozen_bytes <= text + 24 * count and frozen_bytes < list_bytes / 2
    assert frozen.names[7] == _synthetic_paths(8)[7] and int(frozen.offsets[7]) == 10**9 + 1536 * 7


@pytest.fixture
def awkward_folder(tmp_path: Path) -> Path:
    """Names whose order and encoding are easy to get wrong: '.' sorts before '/', nested
    folders before the root's files, non-ASCII and non-UTF-8 names, hidden files and
    non-images that become problems."""
    root = tmp_path / "images"
    names = ["b.jpg", "a/x.jpg", "a.b/y.png", "a/b/z.jpeg", "a/c.jpg", "é/ü.jpg", "z/10.jpg",
             "z/9.jpg", "notes.txt", "a/readme.md", ".hidden.jpg", ".cache/skip.jpg", "日本/写真.webp"]
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"image {index} {name}".encode())
    (root / "z").joinpath(os.fsdecode(b"raw-\xff\xfe.jpg")).write_bytes(b"not utf-8 name")
    return root


def test_folder_catalog_equals_the_list_based_listing(awkward_folder: Path):
    paths, problems = _listed_the_old_way(awkward_folder)
    catalog = FolderCatalog(awkward_folder)
    assert isinstance(catalog.paths, PackedStrings)
    assert list(catalog.paths) == paths and catalog.problems == problems
    assert len(paths) == 10 and len(problems) == 2
    for copy in (catalog, pickle.loads(pickle.dumps(catalog))):
        assert [copy.name(i) for i in range(len(copy))] == [str(awkward_folder / p) for p in paths]
        assert [copy.read(i) for i in range(len(copy))] == \
            [read_regular_file(awkward_folder / p, p, 2**20) for p in paths]
    assert catalog.paths[-1] == paths[-1] and catalog.paths[1:3] == paths[1:3]
    with pytest.raises(IndexError):
        catalog.paths[len(paths)]


def test_packed_strings_round_trip_any_text():
    strings = ["", "a", "é/ü", os.fsdecode(b"\xff"), "x" * 1000, "日本", ""]
    packed = PackedStrings(strings)
    assert list(packed) == strings and len(packed) == len(strings)
    assert list(pickle.loads(pickle.dumps(packed))) == strings
    assert packed.offsets.dtype == np.uint32 and packed.nbytes == packed.blob.nbytes + 4 * 8
    assert list(PackedStrings([])) == []


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (4, 4), value).save(out, format="PNG")
    return out.getvalue()


def test_shard_catalog_packs_its_member_tables(tmp_path: Path):
    # A directory of plain tar files (scanned) ...
    plain = tmp_path / "plain"
    plain.mkdir()
    expected = []
    for shard in range(2):
        with tarfile.open(plain / f"s{shard}.tar", "w") as archive:
            for member in range(3):
                name, data = f"d{member}/é{shard}{member}.png", _png(shard * 10 + member)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                expected.append((f"{plain / f's{shard}.tar'}:{name}", data))
    # ... and a pack with its index.json.
    images = tmp_path / "images"
    for index in range(5):
        (images / f"k{index % 2}").mkdir(parents=True, exist_ok=True)
        (images / f"k{index % 2}" / f"{index}.png").write_bytes(_png(100 + index))
    pack(images, tmp_path / "packed", 200, workers=1, log=lambda *_: None)
    folder = FolderCatalog(images)

    for location, names_and_bytes in (
            (plain, expected),
            (tmp_path / "packed", [(None, folder.read(i)) for i in range(len(folder))])):
        catalog = ShardCatalog(location)
        assert len(catalog.tables) >= 2
        for table in catalog.tables:
            assert isinstance(table.names, PackedStrings)
            assert table.offsets.dtype == np.int64 and table.sizes.dtype == np.int64
        for copy in (catalog, pickle.loads(pickle.dumps(catalog))):
            assert len(copy) == len(names_and_bytes)
            for index, (name, data) in enumerate(names_and_bytes):
                assert copy.read(index) == data
                if name is not None:
                    assert copy.name(index) == name
            copy.close()
