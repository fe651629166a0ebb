"""Pre-decoded shards (`terabrain data pack --decode`): the stored pixels are exactly what
decoding the image files gives, training from them gives exactly the same losses as from
JPEG shards, a configuration asking for other pixels is refused naming the field, and a
corrupt or cut-short member is skipped and counted."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from terabrain.data.catalogs import FolderCatalog, ShardCatalog
from terabrain.data.decode import BadSample, ImageSpec, decode_pixels
from terabrain.data.examples import ImageExamples
from terabrain.data.pack import pack

TRAIN = ["train", "natural-patches-rica", "--set", "optimizer.name=adam", "--set", "optimizer.lr=0.01",
         "--set", "train.batch_size=16", "--set", "data.crop_size=16",
         "--set", "data.patch_size=8", "--set", "data.patches_per_image=4",
         "--set", "data.whitening_fit_samples=64", "--set", "data.holdout_patches=8",
         "--set", "model.hidden=16", "--set", "data.source=shards"]


def _photo_folder(root: Path, count: int) -> None:
    """Textured JPEGs and PNGs of different sizes and orientations (flat images would make
    every resampling agree), plus a truncated JPEG and a non-image."""
    rng = np.random.default_rng(5)
    for index in range(count):
        width, height = (48 + 3 * index, 36 + index) if index % 4 else (30 + index, 52)
        y, x = np.mgrid[0:height, 0:width]
        base = 128 + 100 * np.sin(x / (2 + index % 5)) * np.cos(y / 3)
        pixels = np.clip(base[..., None] + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        kind = "png" if index % 3 == 1 else "jpg"
        sub = root / f"part{index % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img{index:03d}.{kind}", quality=90)
    whole = io.BytesIO()
    Image.fromarray(np.zeros((80, 80, 3), np.uint8) + 90).save(whole, "JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[:300])
    (root / "not-really.png").write_bytes(b"text, not a PNG\n" * 8)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    base = tmp_path_factory.mktemp("predecoded")
    _photo_folder(base / "images", 30)
    quiet = lambda *_: None  # noqa: E731
    pack(base / "images", base / "jpeg", 8000, workers=2, log=quiet)
    pack(base / "images", base / "grey16", 8000, workers=2, log=quiet, decode=ImageSpec(16))
    pack(base / "images", base / "colour8", 8000, workers=2, log=quiet, decode=ImageSpec(300, 8, True))
    return base


@pytest.mark.parametrize("name, spec", [("grey16", ImageSpec(16)), ("colour8", ImageSpec(300, 8, True))])
def test_pack_decode_round_trip_is_bit_exact(packs, name, spec):
    folder = FolderCatalog(packs / "images")
    shards = ShardCatalog(packs / name)
    index = json.loads((packs / name / "index.json").read_text())
    assert index["decoded"] == {"crop_size": spec.crop, "image_size": spec.size, "color": spec.color,
                                "shape": list(spec.shape), "dtype": "uint8", "member": "npy"}
    assert len(index["shards"]) > 1 and all(len(s["crc32"]) == len(s["members"]) for s in index["shards"])
    assert {Path(n).name for n, _ in index["unreadable"]} == {"truncated.jpg", "not-really.png"}
    assert len(shards) == len(folder) - 2 == 30 and shards.problems == []
    reader = shards.decoded.reader(spec, packs / name)
    files = {path + ".npy": i for i, path in enumerate(folder.paths)}
    stored = ImageExamples(shards, spec, seed=0)
    decoded = ImageExamples(folder, spec, seed=0)
    for i in range(len(shards)):
        member = shards.tables[shards.shard_of(i)[0]].names[shards.shard_of(i)[1]]
        pixels = reader(shards.read(i), shards.name(i))
        expected = decode_pixels(folder.read(files[member]), member, spec)
        assert pixels.dtype == np.uint8 and pixels.shape == spec.shape
        np.testing.assert_array_equal(pixels, expected)
        # The float examples training sees: bit-identical too.
        assert np.array_equal(stored(i, 0), decoded(files[member], 0))
        # Each member is an ordinary .npy file.
        np.testing.assert_array_equal(np.load(io.BytesIO(shards.read(i))), expected)


def test_a_smaller_side_is_derived_and_a_larger_one_or_other_colour_refused(packs):
    from terabrain.errors import ConfigError

    shards = ShardCatalog(packs / "grey16")
    folder = FolderCatalog(packs / "images")
    small = ImageExamples(shards, ImageSpec(16, 12), seed=0)
    assert small(0, 0).shape == (1, 144)
    # The same centre square, resampled from the stored pixels: close to decoding the file.
    from_file = ImageExamples(folder, ImageSpec(16, 12), seed=0)
    first = folder.paths.index(shards.tables[0].names[0][: -len(".npy")])
    assert np.abs(small(0, 0) - from_file(first, 0)).mean() < 0.06
    with pytest.raises(ConfigError, match=r"^data\.crop_size: 32-pixel"):
        ImageExamples(shards, ImageSpec(32), seed=0)
    with pytest.raises(ConfigError, match=r"^data\.image_size: 20-pixel"):
        ImageExamples(shards, ImageSpec(300, 20), seed=0)
    with pytest.raises(ConfigError, match=r"^data\.color: .*pre-decoded grey.*--colour"):
        ImageExamples(shards, ImageSpec(16, None, True), seed=0)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_from_predecoded_shards_equals_training_from_jpeg_shards(packs, tmp_path, capsys):
    from terabrain.cli import main

    staged = ["--set", f"data.stage_dir={tmp_path / 'nvme'}", "--set", "data.stage_wait=true"]
    for run, name, extra in (("jpeg", "jpeg", []), ("decoded", "grey16", []), ("staged", "grey16", staged)):
        code = main([*TRAIN, "--set", "train.steps=3", "--set", f"data.root={packs / name}",
                     "--set", "data.workers=2", *extra, "--out", str(tmp_path / run)])
        assert code == 0, capsys.readouterr().err
    jpeg = _losses(tmp_path / "jpeg")
    assert len(jpeg) == 3 and _losses(tmp_path / "decoded") == jpeg
    # Staged pre-decoded shards: read from verified local copies, the same losses again.
    assert "(0 failed)" in capsys.readouterr().err and _losses(tmp_path / "staged") == jpeg


@pytest.mark.parametrize("overrides, named", [
    (["data.color=true"], "data.color: the shards in"),
    (["data.crop_size=24"], "data.crop_size: 24-pixel images asked for"),
    (["data.crop_size=300", "data.image_size=20"], "data.image_size: 20-pixel images asked for"),
])
def test_mismatched_config_exits_2_naming_the_field(packs, tmp_path, capsys, overrides, named):
    from terabrain.cli import main

    sets = [a for o in overrides for a in ("--set", o)]
    code = main([*TRAIN, "--set", "train.steps=1", "--set", f"data.root={packs / 'grey16'}", *sets,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err and "Traceback" not in err


def test_pack_options_need_decode(packs, tmp_path, capsys):
    from terabrain.cli import main

    assert main(["data", "pack", str(packs / "images"), str(tmp_path / "x"), "--crop-size", "32"]) == 2
    assert "--crop-size: only with --decode" in capsys.readouterr().err
    assert main(["data", "pack", str(packs / "images"), str(tmp_path / "y"), "--decode", "--image-size", "0"]) == 2
    assert "--image-size: got 0" in capsys.readouterr().err


def _damaged_copy(packs: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """grey16 with the pixels of two members flipped and the last shard cut inside a member."""
    copy = tmp_path / "damaged"
    shutil.copytree(packs / "grey16", copy)
    index = json.loads((copy / "index.json").read_text())
    corrupt = []
    for entry in index["shards"][:2]:
        name, offset, size = entry["members"][1]
        with open(copy / entry["name"], "r+b") as shard:
            shard.seek(offset + size - 7)
            shard.write(b"\x00\xff\x00\xff\x00")
        corrupt.append(f"{copy / entry['name']}:{name}")
    last = index["shards"][-1]
    name, offset, size = last["members"][-1]
    with open(copy / last["name"], "r+b") as shard:
        shard.truncate(offset + size // 2)
    return copy, corrupt, [f"{copy / last['name']}:{name}"]


def test_corrupt_and_cut_short_members_are_skipped_and_counted(packs, tmp_path, capsys):
    from terabrain.cli import main
    from terabrain.data.pack import format_stats, stats

    damaged, corrupt, cut = _damaged_copy(packs, tmp_path)
    catalog = ShardCatalog(damaged)
    assert [name for name, _ in catalog.problems if "cut short" in _] == cut
    assert len(catalog) == 29
    bad = []
    for i in range(len(catalog)):
        try:
            catalog.read(i)
        except BadSample as error:
            assert "CRC-32" in error.reason
            bad.append(error.name)
    assert bad == corrupt

    report = stats(damaged, workers=2)
    assert sorted(u["name"] for u in report["unreadable"] if "CRC-32" in u["reason"]) == sorted(corrupt)
    assert len(report["checksums"]["mismatched"]) == 2  # the two shards with a corrupt member
    assert report["readable"] == 27 and report["width"]["max"] == 16
    assert "pre-decoded   16x16 grey uint8 .npy members" in format_stats(report)

    # Over an epoch (28 training images, 4 a step) every corrupt member in it is met, at most twice in 8 steps.
    run = tmp_path / "run"
    code = main([*TRAIN, "--set", "train.steps=8", "--set", f"data.root={damaged}",
                 "--set", "data.holdout_patches=1", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The cut shard (its size differs from the index) and its cut-short member.
    assert all(line["data_unusable"] == len(catalog.problems) == 2 for line in lines)
    assert 1 <= lines[-1]["data_skipped"] <= 4
    assert main([*TRAIN, "--set", "train.steps=1", "--set", f"data.root={damaged}",
                 "--set", "data.on_error=fail", "--out", str(tmp_path / "fail")]) == 1
    err = capsys.readouterr().err
    assert f"{cut[0].rsplit(':', 1)[0]}: 1" in err and "the index says" in err  # the cut shard named
