"""The YFCC100M catalog index: a filtered selection from the index is today's ``select()``
line for line (plain, bz2, gz; 25 and 23 columns; bad lines counted), the index is
byte-identical whatever the worker count, interrupted builds restart cleanly, and the
indexed catalog is what training opens for a config that names the metadata file."""

from __future__ import annotations

import bz2
import gzip
import random
from pathlib import Path

import numpy as np
import pytest

from terabrain.data import yfcc_index_build
from terabrain.data.yfcc import COLUMNS_23, COLUMNS_25, YFCCFilter, select
from terabrain.data.yfcc_index import YFCCIndex, open_selection, write_selection
from terabrain.data.yfcc_index_build import build_index

TAGS = ["city", "new+york", "New+York", "beach", "cat", "night", "caf%C3%A9", "+", " ", "people", "NYC",
        "sunset", "%E6%9D%B1%E4%BA%AC", "dog"]


def metadata_lines(count: int, seed: int, columns: int = 25) -> list[str]:
    """Lines as the real file has them plus the odd ones a parser must survive: wrong column
    counts, empty lines, short or missing hashes, ids with leading zeros, odd markers."""
    rng = random.Random(seed)
    lines = []
    for number in range(count):
        photo = rng.randrange(1, 10**10)
        row = dict.fromkeys(COLUMNS_25, "")
        roll = rng.random()
        digest = f"{rng.getrandbits(128):032x}"
        if roll < 0.03:
            digest = rng.choice(["", "abc", "ABCDEF12", "zz99zz", " 00ff00ff00ff00ff00ff00ff00ff00ff "])
        identifier = str(photo)
        if 0.03 <= roll < 0.05:
            identifier = rng.choice(["007", "", "12a", str(2**64 + 5)])
        row.update(line=str(number), id=identifier, hash=digest, user_nsid="12345678@N00",
                   user_nickname="some+one", date_taken="2013-06-01 10:00:00.0", date_uploaded="1370080800",
                   title="a+title", user_tags=",".join(rng.sample(TAGS, rng.randrange(0, 5))),
                   extension=rng.choice(["jpg", "jpg", "png", "JPG", "", "mp4"]),
                   marker=rng.choice(["0", "0", "0", "1", " 0", "2"]))
        names = COLUMNS_25 if columns == 25 else COLUMNS_23
        line = "\t".join(row[c] for c in names)
        if 0.05 <= roll < 0.07:
            line = "\t".join(line.split("\t")[: rng.randrange(1, 24)])  # wrong column count
        lines.append(line)
        if rng.random() < 0.02:
            lines.append("")
    return lines


def write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    text = newline.join(lines) + newline
    data = text.encode()
    if path.suffix == ".bz2":
        path.write_bytes(bz2.compress(data))
    elif path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


FILTERS = [
    YFCCFilter(),
    YFCCFilter("any"),
    YFCCFilter("video"),
    YFCCFilter("photo", tags_any=("city", "new york")),
    YFCCFilter("any", tags_all=("city", "night"), tags_none=("cat",)),
    YFCCFilter("photo", tags_none=("café", "東京")),
    YFCCFilter("any", tags_any=("no such tag",)),
]


def selected(index: YFCCIndex, keep: YFCCFilter, layout: str, name: str):
    from terabrain.data.yfcc_index import IndexProblems

    chosen, pathless = index.select(keep, layout)
    return [index.image_path(int(r), layout) for r in chosen], list(IndexProblems(index, pathless, name))


@pytest.mark.parametrize("suffix,columns,newline", [
    ("", 25, "\n"), (".bz2", 25, "\n"), (".gz", 23, "\r\n"), ("", 23, "\r"),
])
def test_index_selection_equals_select_line_for_line(tmp_path, suffix, columns, newline, monkeypatch):
    monkeypatch.setattr(yfcc_index_build, "BLOCK", 4096)  # many work units on a small file
    metadata = write(tmp_path / f"yfcc100m_dataset{suffix}", metadata_lines(600, seed=columns, columns=columns),
                     newline)
    index = YFCCIndex(build_index(metadata, tmp_path / "x.tbindex", workers=1))
    try:
        for keep in FILTERS:
            for layout in ("hash", "id"):
                paths, problems = select(metadata, keep, layout)
                assert selected(index, keep, layout, str(metadata)) == (paths, problems), (keep, layout)
        bad = [p for p in select(metadata, YFCCFilter("any"), "id")[1] if "columns" in p[1]]
        assert len(bad) == len(index["bad_lines"]) > 5  # lines with the wrong column count, counted
        assert index.checksum.startswith("sha256")
    finally:
        index.close()


@pytest.mark.parametrize("suffix", ["", ".bz2"])
def test_index_is_byte_identical_for_one_and_two_workers(tmp_path, suffix, monkeypatch):
    monkeypatch.setattr(yfcc_index_build, "BLOCK", 8192)
    metadata = write(tmp_path / f"meta{suffix}", metadata_lines(800, seed=3))
    one = build_index(metadata, tmp_path / "one.tbindex", workers=1)
    two = build_index(metadata, tmp_path / "two.tbindex", workers=2)
    assert one.read_bytes() == two.read_bytes()
    assert not list(tmp_path.glob(".*building*"))  # the work directory is gone


def test_interrupted_build_restarts_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(yfcc_index_build, "BLOCK", 4096)
    metadata = write(tmp_path / "meta", metadata_lines(500, seed=5))
    reference = build_index(metadata, tmp_path / "reference.tbindex").read_bytes()
    target = tmp_path / "meta.tbindex"
    calls = []
    original = yfcc_index_build._parse_block

    def dies_on_the_fourth_unit(job):
        calls.append(job[1])
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return original(job)

    monkeypatch.setattr(yfcc_index_build, "_parse_block", dies_on_the_fourth_unit)
    with pytest.raises(KeyboardInterrupt):
        build_index(metadata, target)
    assert not target.exists()  # no half-written index
    calls.clear()
    monkeypatch.setattr(yfcc_index_build, "_parse_block", lambda job: calls.append(job[1]) or original(job))
    build_index(metadata, target)
    assert calls and calls[0] == 3  # the three finished units were kept
    assert target.read_bytes() == reference
    # A work directory left by a different version of the source is discarded, not mixed in.
    monkeypatch.setattr(yfcc_index_build, "_parse_block", dies_on_the_fourth_unit)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_index(metadata, target)
    write(metadata, metadata_lines(500, seed=6))
    monkeypatch.setattr(yfcc_index_build, "_parse_block", original)
    fresh = YFCCIndex(build_index(metadata, target))
    assert [fresh.image_path(int(r), "hash") for r in fresh.select(YFCCFilter(), "hash")[0]] == \
        select(metadata, YFCCFilter(), "hash")[0]
    fresh.close()


def test_saved_selection_is_a_memory_map(tmp_path):
    metadata = write(tmp_path / "meta", metadata_lines(300, seed=7))
    index = YFCCIndex(build_index(metadata, tmp_path / "meta.tbindex"))
    keep = YFCCFilter("photo", tags_any=("city",))
    chosen, pathless = open_selection(write_selection(index, keep, "hash"))
    assert isinstance(chosen, np.memmap)
    expected = index.select(keep, "hash")
    assert np.array_equal(chosen, expected[0]) and np.array_equal(pathless, expected[1])
    index.close()


def _prepare(metadata, index_dir, builder, queue):
    from terabrain.data.yfcc_index_build import prepare_selection

    paths = prepare_selection(Path(metadata), Path(index_dir), YFCCFilter("photo", tags_any=("city",)), "hash",
                              builder=builder, workers=1)
    queue.put((builder, [str(p) for p in paths]))


def test_one_rank_of_a_node_builds_the_others_wait_then_reuse(tmp_path, capfd):
    import multiprocessing

    metadata = write(tmp_path / "meta", metadata_lines(3000, seed=9))
    out = tmp_path / "index"
    out.mkdir()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    waiters = [context.Process(target=_prepare, args=(metadata, out, False, queue)) for _ in range(2)]
    for waiter in waiters:  # the waiting local ranks start first and find nothing yet
        waiter.start()
    builder = context.Process(target=_prepare, args=(metadata, out, True, queue))
    builder.start()
    results = [queue.get(timeout=120) for _ in range(3)]
    for process in waiters + [builder]:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len({tuple(paths) for _, paths in results}) == 1
    assert capfd.readouterr().err.count("building the catalog index") == 1
    index_file = out / "meta.tbindex"
    built = index_file.stat().st_mtime_ns
    # A second run reuses the matching index; a changed source makes the builder rebuild it.
    _prepare(metadata, out, True, queue)
    assert index_file.stat().st_mtime_ns == built
    write(metadata, metadata_lines(3000, seed=10))
    _prepare(metadata, out, True, queue)
    index = YFCCIndex(index_file)
    assert index.records == len(select(metadata, YFCCFilter("any"), "id")[0]) + sum(
        1 for _, why in select(metadata, YFCCFilter("any"), "id")[1] if "photo hash" in why)
    index.close()


def test_data_index_command(tmp_path):
    from terabrain.cli import main

    metadata = write(tmp_path / "meta.gz", metadata_lines(200, seed=11))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["data", "index", str(metadata), "--out", str(out), "--workers", "2"]) == 0
    index = YFCCIndex(out / "meta.gz.tbindex")
    assert [index.image_path(int(r), "id") for r in index.select(YFCCFilter(), "id")[0]] == \
        select(metadata, YFCCFilter(), "id")[0]
    index.close()
    assert main(["data", "index", str(tmp_path / "missing")]) == 2
    assert main(["data", "index", str(metadata), "--workers", "0"]) == 2


@pytest.mark.slow
def test_two_rank_training_from_the_metadata_file_builds_once_and_keeps_batches_full(tmp_path):
    import json

    from collections_for_tests import image_bytes
    from conftest import run_cli, torchrun

    rng = random.Random(12)
    root, lines = tmp_path / "images", []
    for number in range(40):
        row = dict.fromkeys(COLUMNS_25, "")
        digest = f"{rng.getrandbits(128):032x}"
        row.update(line=str(number), id=str(1000 + number), hash=digest, user_tags="city,night",
                   extension="jpg", marker="0")
        lines.append("\t".join(row[c] for c in COLUMNS_25))
        folder = root / digest[:3] / digest[3:6]
        folder.mkdir(parents=True, exist_ok=True)
        # Every eighth image is damaged (cut short), one is missing: replaced, never a short batch.
        data = image_bytes(number % 40, "jpeg", (48, 40))
        if number % 8 == 3:
            data = data[:100]
        if number != 17:
            (folder / f"{digest}.jpg").write_bytes(data)
    lines.append("a\tline\twith\tfour")
    metadata = write(tmp_path / "yfcc100m_dataset.bz2", lines)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    sets = ["train", "natural-patches-rica", "--set", "data.source=yfcc", "--set", f"data.metadata={metadata}",
            "--set", f"data.root={root}", "--set", f"data.index_dir={index_dir}", "--set", "data.crop_size=16",
            "--set", "data.image_size=8", "--set", "data.whitening=none", "--set", "data.holdout_patches=2",
            "--set", "optimizer.name=adam", "--set", "optimizer.lr=0.01", "--set", "train.batch_size=8",
            "--set", "train.steps=6", "--set", "train.log_every=1", "--set", "model.hidden=8",
            "--set", "data.workers=1"]
    result = torchrun(2, "-m", "terabrain", *sets, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("building the catalog index") == 1  # local rank 0 built, rank 1 waited
    assert "1 unusable entry" in result.stderr  # the four-column line, counted
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and all(m["data_batch"] == 8 for m in metrics)
    assert metrics[-1]["data_skipped"] > 0 and all(m["data_unusable"] == 1 for m in metrics)
    # A second run finds the matching index and its saved selection: nothing is parsed again.
    again = run_cli(*sets, "--out", str(tmp_path / "one"))
    assert again.returncode == 0, again.stderr
    assert "building the catalog index" not in again.stderr
    assert len(list(index_dir.glob("*.select-*.npy"))) == 1


def test_indexed_catalog_travels_to_worker_processes(tmp_path):
    import pickle

    from terabrain.data.catalogs import IndexedYFCCCatalog

    metadata = write(tmp_path / "meta", metadata_lines(300, seed=13))
    index = YFCCIndex(build_index(metadata, tmp_path / "meta.tbindex"))
    selection = write_selection(index, YFCCFilter(), "id")
    index.close()
    catalog = IndexedYFCCCatalog(tmp_path / "meta.tbindex", selection, tmp_path / "images", "id", str(metadata))
    paths, problems = select(metadata, YFCCFilter(), "id")
    assert [catalog.name(i) for i in range(len(catalog))] == [str(tmp_path / "images" / p) for p in paths]
    assert list(catalog.problems) == problems
    copy = pickle.loads(pickle.dumps(catalog))  # what a DataLoader worker receives: paths, not maps
    assert len(pickle.dumps(catalog)) < 2000
    assert [copy.name(i) for i in range(len(copy))] == [catalog.name(i) for i in range(len(catalog))]
