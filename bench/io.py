#!/usr/bin/env python
"""Does the reader keep up with training? Images per second per process for decoding plus
the seed-000 preprocessing (scale the smaller side to 300, centre crop 300x300), beside the
rate at which the training step of the built-in experiments consumes examples, in one run.

Collection: ``--images`` JPEG photographs of 640x480 (quality 90, about the size of a
Flickr "medium" download), cut from the photographs bundled with scikit-image and
scikit-learn, packed into tar shards with ``terabrain data pack``.

Reader cases (each the full streaming path: shard read, decode, preprocessing, batch
assembly, prefetch queue): worker threads 1 and N, worker processes N (DataLoader), and
the same shards staged to a second directory (``data.stage_dir``). Both directories are on
this machine's local disk and the files are in the page cache after the first pass, so
staged vs unstaged measures staging's overhead on the read path, not Lustre vs NVMe.
Then the same images from pre-decoded shards (``terabrain data pack --decode``, one pack
per pipeline): worker threads 1 and N; no JPEG is decoded, each member's CRC-32 is checked.

Consumers: the training step of each built-in experiment that runs on this machine, on
random data of its input size and batch size (the step costs the same whatever the pixels),
in examples per second; converted to images per second at the patches one image yields
(``--patches-per-image`` for the patch experiments; 1 for whole-image inputs), and a
seed-000-like step (RICA on whole 300x300 grey images, 128 features, mini-batch 192).
Target: reader >= 3x consumption.

    python bench/io.py                    # defaults: 192 images, N = all cores
    python bench/io.py --images 960 --workers 8 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

from terabrain.config.loader import load_experiment
from terabrain.config.schema import TrainConfig
from terabrain.data.sources import data_config
from terabrain.data.decode import ImageSpec
from terabrain.data.embedded import PHOTOS, load_photo
from terabrain.data.pack import pack
from terabrain.data.streamed_source import StreamSource
from terabrain.learners.registry import build_model
from terabrain.objectives import build_objective
from terabrain.train.stage import build_trainer

TARGET = 3.0


def make_collection(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    photos = [load_photo(name, color=True) for name in PHOTOS]
    photos = [p for p in photos if p.shape[0] >= 240 and p.shape[1] >= 320]
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.5, 1.0)), int(width * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = Image.fromarray((photo[top : top + crop_h, left : left + crop_w] * 255).astype(np.uint8))
        image = image.resize((640, 480) if index % 4 else (480, 640), Image.Resampling.BILINEAR)
        image.save(folder / f"img{index:05d}.jpg", quality=90)


PIPELINES = {
    # name: (image_size, colour): what the consumers below are fed
    "seed-000: 300x300 grey": (None, False),
    "32x32 colour (lbann-ae-small)": (32, True),
}


def reader_rate(root: Path, pipeline: str, workers: int, kind: str, stage: Path | None,
                batch: int, passes: int) -> float:
    size, color = PIPELINES[pipeline]
    config = data_config(source="shards", root=root, crop_size=300, image_size=size, color=color,
                        remove_mean=False, whitening="none", holdout_patches=1, workers=workers,
                        worker_kind=kind, prefetch=4, stage_dir=stage)
    source = StreamSource(config, seed=0)
    stream = source.open(batch, None, torch.device("cpu"))
    if source.stager is not None:
        source.stager.wait()  # staged case: measure reads from the verified local copies
    stream.batch(0)  # warm-up: workers started, page cache filled
    steps = stream.order.per_epoch * passes
    begin = time.perf_counter()
    images = step = 0
    # At least ``passes`` epochs and a second: a fast reader's two epochs would be too short to time.
    while step < steps or time.perf_counter() - begin < 1.0:
        step += 1
        images += len(stream.batch(step)[0])
    elapsed = time.perf_counter() - begin
    stream.close()
    source.close()
    return images / elapsed


def consumer_rate(name: str, overrides: list[str], steps: int, device: torch.device) -> tuple[float, int, int]:
    """Examples per second of the training step of a built-in experiment; its batch and input size."""
    config = load_experiment(name, overrides)
    if config.data.source == "digits":
        inputs = 64
    else:
        channels = 3 if config.data.color else 1
        inputs = config.data.patch_size ** 2 * channels
    batch = config.train.batch_size or config.data.num_patches
    torch.manual_seed(0)
    x = torch.randn(batch, inputs)
    model = build_model(config.model, inputs, seed=0)
    trainer = build_trainer(model, build_objective(config.objective), optimizer=config.optimizer,
                            train=TrainConfig(steps=steps, batch_size=batch), seed=0, inputs=x,
                            device=device)
    trainer.train_step(*trainer.batch(0))  # warm-up
    _sync(device)
    begin = time.perf_counter()
    for step in range(1, steps + 1):
        trainer.train_step(*trainer.batch(step))
    _sync(device)
    return batch * steps / (time.perf_counter() - begin), batch, inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=16, help="images per reader batch")
    parser.add_argument("--passes", type=int, default=2, help="epochs read per reader case")
    parser.add_argument("--patches-per-image", type=int, default=16,
                        help="patches one image yields for the patch experiments")
    parser.add_argument("--device", default="cpu", help="where the training steps run (cpu, cuda)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    scratch = Path(tempfile.mkdtemp(prefix="terabrain-io-"))
    try:
        load = OtherLoad()
        make_collection(scratch / "images", args.images)
        pack(scratch / "images", scratch / "shards", shard_bytes=8_000_000, log=lambda *_: None)
        size = sum(p.stat().st_size for p in (scratch / "shards").glob("*.tar"))
        decoded_bytes = {}
        for number, (pipeline, (image_size, color)) in enumerate(PIPELINES.items()):
            pack(scratch / "images", scratch / f"decoded-{number}", shard_bytes=64_000_000,
                 log=lambda *_: None, decode=ImageSpec(300, image_size, color))
            decoded_bytes[pipeline] = sum(p.stat().st_size for p in (scratch / f"decoded-{number}").glob("*.tar"))
        n = args.workers
        cases = [("threads", 1, "thread", None), ("threads", n, "thread", None),
                 ("processes", n, "process", None), ("threads, staged", n, "thread", scratch / "stage")]
        readers = []
        for pipeline in PIPELINES:
            for label, workers, kind, stage in cases:
                if stage is not None and pipeline != next(iter(PIPELINES)):
                    continue  # staging changes where bytes come from, not the decoding
                rate = reader_rate(scratch / "shards", pipeline, workers, kind, stage, args.batch, args.passes)
                readers.append({"pipeline": pipeline, "case": f"{label} x{workers}", "images_per_s": rate})
        for number, pipeline in enumerate(PIPELINES):
            for workers in (1, n):
                rate = reader_rate(scratch / f"decoded-{number}", pipeline, workers, "thread", None,
                                   args.batch, args.passes)
                readers.append({"pipeline": pipeline, "case": f"pre-decoded, threads x{workers}",
                                "images_per_s": rate})
        seed, small = PIPELINES
        consumers = []
        for label, name, overrides, per_image, pipeline, steps in [
            ("natural-patches-rica (default)", "natural-patches-rica", [], args.patches_per_image, seed, 1),
            ("seed-000-like: RICA 300x300, batch 192", "natural-patches-rica",
             ["data.patch_size=300", "train.batch_size=192", "optimizer.name=sgd", "optimizer.lr=0.01"], 1, seed, 5),
            ("lbann-ae-small", "lbann-ae-small", [], 1, small, 20),
        ]:
            rate, batch, inputs = consumer_rate(name, overrides, steps * (20 if args.device == "cuda" else 1),
                                                torch.device(args.device))
            consumers.append({"experiment": label, "batch": batch, "inputs": inputs, "pipeline": pipeline,
                              "examples_per_s": rate, "examples_per_image": per_image,
                              "images_per_s": rate / per_image})
        other = load.cores()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    best = {p: max(r["images_per_s"] for r in readers if r["pipeline"] == p) for p in PIPELINES}
    jpeg = {p: max(r["images_per_s"] for r in readers if r["pipeline"] == p and "pre-decoded" not in r["case"])
            for p in PIPELINES}
    for c in consumers:
        c["reader_over_need"] = best[c["pipeline"]] / c["images_per_s"]
        c["jpeg_reader_over_need"] = jpeg[c["pipeline"]] / c["images_per_s"]
    result = {"images": args.images, "shard_bytes": size, "decoded_shard_bytes": decoded_bytes,
              "workers": n, "cpu_count": os.cpu_count(),
              "readers": readers, "consumers": consumers, "other_load_cores": other, "target": TARGET}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"bench/io.py: {args.images} JPEGs 640x480 in {size / 1e6:.1f} MB of shards; decode + "
          f"seed-000 preprocessing (smaller side to 300, centre crop); {os.cpu_count()} cores")
    for pipeline, bytes_ in decoded_bytes.items():
        print(f"pre-decoded shards for {pipeline}: {bytes_ / 1e6:.1f} MB ({bytes_ / args.images / 1e3:.1f} kB "
              f"per image; JPEG shards {size / args.images / 1e3:.1f} kB per image)")
    print(f"{'reader (one process)':<34}{'pipeline':<32}{'images/s':>10}")
    for r in readers:
        print(f"  {r['case']:<32}{r['pipeline']:<32}{r['images_per_s']:>10.1f}")
    print(f"{'training step on ' + args.device:<40}{'examples/s':>11}{'ex/image':>9}{'images/s':>10}"
          f"{'best JPEG':>11}{'ratio':>7}{'best reader':>12}{'ratio':>8}")
    for c in consumers:
        print(f"  {c['experiment']:<38}{c['examples_per_s']:>11.0f}{c['examples_per_image']:>9}"
              f"{c['images_per_s']:>10.1f}{jpeg[c['pipeline']]:>11.1f}{c['jpeg_reader_over_need']:>6.1f}x"
              f"{best[c['pipeline']]:>12.1f}{c['reader_over_need']:>7.1f}x")
    print(f"target: reader >= {TARGET:.0f}x what training consumes (last column: the best of all readers, "
          "pre-decoded included; the first ratio: JPEG shards only). Reader and step "
          "were timed one after the other, each with all cores; on a GPU node the step runs on the GPU.")
    if other is not None:
        print(f"other load on the machine while measuring: {other:.2f} cores (shared machine: figures vary)")


if __name__ == "__main__":
    sys.exit(main())
