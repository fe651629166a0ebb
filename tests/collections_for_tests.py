"""Small image collections the data tests write themselves, with the damage real
collections have: truncated JPEGs, files that are not images, empty and truncated shards,
a tar member that tries to escape with ``../``.

Image ``i`` is a flat grey of level ``LEVEL_STEP * i`` (PNG, exact) or a JPEG of the same
level (lossy, within a few levels), so a decoded example tells which image it came from: the
tests check the examples themselves, not only the loader's bookkeeping.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

LEVEL_STEP = 4  # 64 distinguishable images


def image_bytes(index: int, kind: str = "png", size: tuple[int, int] = (40, 30)) -> bytes:
    level = LEVEL_STEP * index
    assert level <= 255
    image = Image.fromarray(np.full((size[1], size[0]), level, dtype=np.uint8), "L")
    if kind == "rgb-jpeg":
        image = image.convert("RGB")
        kind = "jpeg"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if kind == "jpeg" else "PNG", quality=95)
    return buffer.getvalue()


def image_id(example: np.ndarray) -> int:
    """Which image a decoded (not whitened, not mean-removed) example came from."""
    level = float(np.mean(example)) * 255.0
    index = int(round(level / LEVEL_STEP))
    assert abs(level - LEVEL_STEP * index) < 1.0, f"example of level {level:.2f} is no test image"
    return index


def write_folder(root: Path, count: int, damaged: bool = True) -> dict:
    """``count`` good images (PNG and JPEG, in subfolders) and, if ``damaged``, a truncated
    JPEG, a non-image file with an image name, a text file and an empty .png."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        kind = "jpeg" if index % 3 == 0 else "png"
        sub = root / f"part{index % 2}"
        sub.mkdir(exist_ok=True)
        size = (40 + index % 7, 30 + index % 5)
        (sub / f"img{index:03d}.{'jpg' if kind == 'jpeg' else 'png'}").write_bytes(image_bytes(index, kind, size))
    bad = {}
    if damaged:
        whole = image_bytes(63, "jpeg", (200, 160))
        (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (root / "not-really.png").write_bytes(b"this is a text file pretending to be a PNG\n" * 4)
        (root / "empty.png").write_bytes(b"")
        (root / "README.txt").write_text("notes about the photographs\n")
        bad = {"truncated.jpg", "not-really.png", "empty.png"}
    return {"good": count, "bad": bad, "not_images": {"README.txt"}}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def write_raw_shards(root: Path, count: int) -> dict:
    """WebDataset-style shards without an index: two good shards (with .cls side files), an
    empty shard, a truncated shard, and a malicious ``../`` member."""
    root.mkdir(parents=True, exist_ok=True)
    half = count // 2
    write_tar(root / "a-000.tar", [m for i in range(half) for m in
                                    ((f"s{i:04d}.png", image_bytes(i)), (f"s{i:04d}.cls", b"0"))])
    write_tar(root / "a-001.tar", [(f"s{i:04d}.jpg", image_bytes(i, "jpeg")) for i in range(half, count)]
              + [("../../escape.png", image_bytes(62))])
    (root / "a-002.tar").write_bytes(b"")
    truncated = root / "a-003.tar"
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(noise, "PNG")
    write_tar(truncated, [("t0.png", image_bytes(61)), ("t1.png", noise.getvalue())])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # cuts t1 in the middle
    return {"good": count + 1, "refused": "../../escape.png"}


def recording_trainer(stream, seen: dict, manager, *, steps: int, batch_size: int, checkpoint_every: int,
                      units: int, model_seed: int, seed: int, parallel=None):
    """A RICA trainer on 16x16 streamed examples that checkpoints every ``checkpoint_every``
    steps and records, per step, which images its batch held (into ``seen``)."""

    from terabrain.config.schema import OptimizerConfig, TrainConfig
    from terabrain.nn.autoencoder import RICA
    from terabrain.objectives import RICAObjective
    from terabrain.train import callbacks as cb
    from terabrain.train.stage import build_trainer

    trainer = build_trainer(
        RICA(16 * 16, units, seed=model_seed), RICAObjective(0.1, 0.01),
        optimizer=OptimizerConfig(name="adam", lr=0.01),
        train=TrainConfig(steps=steps, batch_size=batch_size), seed=seed, parallel=parallel,
        callbacks=[cb.Checkpointing(manager, checkpoint_every)], batches=stream)
    original = trainer.batch

    def recording_batch(step):
        x, y = original(step)
        seen[step] = [image_id(row) for row in x.numpy()]
        return x, y

    trainer.batch = recording_batch
    return trainer


def interrupted_and_resumed(open_stream, manager, *, steps: int, checkpoint_at: int, batch_size: int,
                            parallel=None):
    """A session that stops right after its checkpoint at ``checkpoint_at`` (as if killed),
    then a fresh trainer restored from it that runs to ``steps``: the images of each step
    of both sessions (``first``, ``second``; JSON keys) and the step the second one resumed
    at (``resumed_at``)."""
    from terabrain.train.checkpoint import restore

    first, second = {}, {}
    settings = dict(steps=steps, batch_size=batch_size, checkpoint_every=checkpoint_at, units=8,
                    model_seed=3, seed=0, parallel=parallel)
    trainer = recording_trainer(open_stream(), first, manager, **settings)
    trainer.steps = checkpoint_at
    trainer.fit()
    resumed = recording_trainer(open_stream(), second, manager, **settings)
    restore(manager.latest(), resumed)
    start = resumed.step
    resumed.fit()
    return {"first": {str(k): v for k, v in first.items()},
            "second": {str(k): v for k, v in second.items()}, "resumed_at": start}
