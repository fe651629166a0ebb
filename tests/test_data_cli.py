"""`terabrain data pack` / `terabrain data stats`, training on packed shards with staging,
and configuration mistakes: exit 2 with the field named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from collections_for_tests import write_folder

TRAIN = ["train", "natural-patches-rica", "--set", "optimizer.name=adam", "--set", "optimizer.lr=0.01",
         "--set", "train.steps=4", "--set", "train.batch_size=16", "--set", "data.crop_size=16",
         "--set", "data.patch_size=8", "--set", "data.patches_per_image=4",
         "--set", "data.whitening_fit_samples=64", "--set", "data.holdout_patches=8",
         "--set", "model.hidden=16", "--set", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, request):
    from conftest import run_cli

    base = tmp_path_factory.mktemp("pack")
    write_folder(base / "images", 30)
    result = run_cli("data", "pack", str(base / "images"), str(base / "shards"), "--shard-size", "4KB")
    assert result.returncode == 0, result.stderr
    return base, result


def test_pack_writes_shards_index_and_checksums_leaving_out_damaged_files(packed):
    base, result = packed
    shards = base / "shards"
    index = json.loads((shards / "index.json").read_text())
    assert len(index["shards"]) > 1 and sum(len(s["members"]) for s in index["shards"]) == 30
    left_out = {Path(name).name for name, _ in index["unreadable"]}
    assert left_out == {"truncated.jpg", "not-really.png", "empty.png", "README.txt"}
    assert "left out" in result.stdout and "truncated.jpg" in result.stdout
    sums = dict(reversed(line.split("  ")) for line in (shards / "SHA256SUMS").read_text().splitlines())
    for shard in index["shards"]:
        assert hashlib.sha256((shards / shard["name"]).read_bytes()).hexdigest() == shard["sha256"] == sums[shard["name"]]
        # Members fill at most --shard-size; tar's end-of-archive padding adds up to 10 KiB.
        assert (shards / shard["name"]).stat().st_size == shard["bytes"] <= 4000 + 10240
        assert shard["members"][-1][1] + shard["members"][-1][2] <= 4000
    assert not list(shards.glob(".*partial"))


def test_stats_reports_counts_sizes_unreadable_and_checksums(packed, cli, tmp_path):
    base, _ = packed
    result = cli("data", "stats", str(base / "shards"), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["samples"] == stats["readable"] == 30 and stats["unreadable"] == []
    assert stats["checksums"]["mismatched"] == [] and stats["left_out_when_packed"] == 4
    assert stats["width"]["min"] == 40 and stats["width"]["max"] == 46
    folder = cli("data", "stats", str(base / "images"))
    assert folder.returncode == 0
    assert "samples       33" in folder.stdout and "unreadable    4" in folder.stdout
    assert "truncated.jpg" in folder.stdout
    # A shard changed after packing: stats names it and exits 1.
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(base / "shards", copy)
    first = sorted(copy.glob("*.tar"))[0]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    tampered = cli("data", "stats", str(copy))
    assert tampered.returncode == 1 and f"MISMATCH {first}" in tampered.stdout


def test_pack_refuses_an_existing_pack_and_bad_sizes(packed, capsys):
    from terabrain.cli import main

    base, _ = packed
    assert main(["data", "pack", str(base / "images"), str(base / "shards")]) == 2
    assert "already holds packed shards" in capsys.readouterr().err
    assert main(["data", "pack", str(base / "images"), str(base / "other"), "--shard-size", "lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, named", [
    (["data.source=folder"], "data.root is required"),
    (["data.source=folder", "data.root=/nonexistent/images"], "data.root: not a directory"),
    (["data.source=folder", "data.root=IMAGES", "data.on_error=ignore"], "data.on_error: got 'ignore'; allowed: 'skip' or 'fail'"),
    (["data.source=shards", "data.root=SHARDS", "data.block_size=10"], "data.block_size (10) must be a multiple"),
    (["data.source=folder", "data.root=IMAGES", "data.stage_dir=/tmp/x"], "data.stage_dir is not a field of data.source=folder"),
    (["data.source=shards", "data.root=SHARDS", "train.batch_size=null"], "train.batch_size: a streamed collection needs"),
    (["data.source=shards", "data.root=SHARDS", "data.stage_wait=true"], "data.stage_wait needs data.stage_dir"),
])
def test_bad_data_fields_exit_2_naming_the_field(packed, tmp_path, capsys, overrides, named):
    from terabrain.cli import main

    base, _ = packed
    sets = []
    for item in overrides:
        item = item.replace("SHARDS", str(base / "shards")).replace("IMAGES", str(base / "images"))
        sets += ["--set", item]
    code = main([*TRAIN, *sets, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err


def _metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_on_staged_shards_via_the_cli(packed, cli, tmp_path):
    """Staging changes where bytes are read from, never the results. In the background it may
    not finish before a 4-step run does, so that run checks only what it staged; with
    data.stage_wait every shard is staged and verified before the first step."""
    base, _ = packed
    shards = ["--set", "data.source=shards", "--set", f"data.root={base / 'shards'}",
              "--set", "data.block_size=8"]
    runs = {name: tmp_path / name for name in ("shared", "background", "waited")}
    stages = {"background": tmp_path / "nvme-background", "waited": tmp_path / "nvme-waited"}
    for name, run in runs.items():
        staging = []
        if name in stages:
            staging = ["--set", f"data.stage_dir={stages[name]}"]
        if name == "waited":
            staging += ["--set", "data.stage_wait=true"]
        result = cli(*TRAIN, *shards, *staging, "--out", str(run))
        assert result.returncode == 0, result.stdout + result.stderr
        if name == "waited":
            assert "staged" in result.stderr and "(0 failed)" in result.stderr

    lines = {name: _metric_lines(run) for name, run in runs.items()}
    shared = lines["shared"]
    assert [line["step"] for line in shared] == [1, 2, 3, 4]
    assert all(line["data_skipped"] == 0 and line["data_unusable"] == 0 for line in shared)
    assert shared[-1]["loss"] < shared[0]["loss"]
    for name in stages:
        assert [line["loss"] for line in lines[name]] == [line["loss"] for line in shared]
        assert all(line["data_staging_failed"] == 0 for line in lines[name])
    background = [line["data_staged"] for line in lines["background"]]
    assert background == sorted(background)

    index = json.loads((base / "shards" / "index.json").read_text())
    assert all(line["data_staged"] == len(index["shards"]) for line in lines["waited"])
    for name, stage in stages.items():
        staged = next(stage.iterdir())
        for shard in index["shards"]:
            marker = staged / f"{shard['name']}.sha256"
            if name == "background" and not marker.exists():
                continue  # the run ended first; the stopped copy stays a .partial
            assert marker.read_text().strip() == shard["sha256"]
            assert hashlib.sha256((staged / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert len(list(next(stages["background"].iterdir()).glob("*.sha256"))) >= background[-1]


def test_damaged_files_are_counted_in_metrics_and_tensorboard(packed, cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _ = packed
    run = tmp_path / "run"
    result = cli(*TRAIN, "--set", "data.source=folder", "--set", f"data.root={base / 'images'}",
                 "--set", "train.batch_size=32", "--set", "data.holdout_patches=4", "--out", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "README.txt" in result.stderr and "skipped" in result.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [line["data_skipped"] for line in lines]
    assert skipped == sorted(skipped) and 0 < skipped[-1] <= 4 * 3  # 3 damaged files, 4 steps
    assert all(line["data_unusable"] == 1 for line in lines)  # README.txt
    assert all(line["data_batch"] == 32 for line in lines)  # damaged images replaced: full batches
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.value for e in events.Scalars("features/data_skipped")] == skipped
