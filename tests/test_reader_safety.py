"""The image reader does not trust the file system: a real FIFO named .jpg, a real symlink to
/dev/zero and a file larger than data.max_file_bytes are unreadable examples (skipped and
counted), never a hang or an endless read; a read blocked in the kernel does not keep the
process alive past data.read_timeout_s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from collections_for_tests import image_bytes, image_id, write_folder
from conftest import hang_fails

from terabrain.data.catalogs import FolderCatalog, ShardCatalog, read_regular_file
from terabrain.data.decode import BadSample
from terabrain.data.sources import data_config
from terabrain.data.streamed_source import StreamSource

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_hang():
    with hang_fails(120):
        yield


def hostile_folder(root: Path, good: int = 12) -> dict[str, Path]:
    write_folder(root, good, damaged=False)
    hostile = {"fifo": root / "fifo.jpg", "zero": root / "zero.jpg", "big": root / "big.png"}
    os.mkfifo(hostile["fifo"])
    os.symlink("/dev/zero", hostile["zero"])
    hostile["big"].write_bytes(image_bytes(5, "png", (40, 30)) + b"\0" * 5000)
    return hostile


def test_a_fifo_a_device_and_an_oversized_file_are_unreadable_examples(tmp_path):
    hostile = hostile_folder(tmp_path / "images")
    catalog = FolderCatalog(tmp_path / "images", max_bytes=4000)
    reasons = {}
    for index in range(len(catalog)):
        try:
            data = catalog.read(index)
        except BadSample as bad:
            reasons[Path(bad.name).name] = bad.reason
        else:
            assert len(data) <= 4000
    assert reasons.keys() == {"fifo.jpg", "zero.jpg", "big.png"}
    assert "FIFO" in reasons["fifo.jpg"]
    assert "character device" in reasons["zero.jpg"]
    assert "max_file_bytes" in reasons["big.png"]
    # A symlink to a regular file is read like the file itself.
    os.symlink(tmp_path / "images" / "part0" / "img000.jpg", tmp_path / "link.jpg")
    assert read_regular_file(tmp_path / "link.jpg", "link", 10**6) == (
        tmp_path / "images" / "part0" / "img000.jpg").read_bytes()
    assert hostile["fifo"].exists()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_training_stream_skips_them_and_counts_them(tmp_path, kind):
    hostile_folder(tmp_path / "images")
    config = data_config(source="folder", root=tmp_path / "images", crop_size=16,
                         remove_mean=False, whitening="none", holdout_patches=1, workers=2,
                         worker_kind=kind, read_timeout_s=20, max_file_bytes=4000)
    source = StreamSource(config, seed=0)
    stream = source.open(4, None, torch.device("cpu"))
    began = time.monotonic()
    seen, asked = [], []
    for step in range(stream.order.per_epoch):
        seen += [image_id(row) for row in stream.batch(step)[0].numpy()]
        asked += [int(i) for i in stream.local_ids(step)]
    assert time.monotonic() - began < 20
    hostile_asked = sum(1 for i in asked
                        if Path(source.catalog.name(i)).stem in ("fifo", "zero", "big"))
    assert stream.metrics()["data_skipped"] == hostile_asked > 0
    # Each refused file's slot is taken by a readable example of the rank's order: every
    # batch is full (terabrain.data.batch_stream).
    assert len(seen) == len(asked)
    stream.close()


def test_a_fifo_in_place_of_a_shard_does_not_hang(tmp_path):
    from terabrain.data.pack import pack

    write_folder(tmp_path / "images", 6, damaged=False)
    pack(tmp_path / "images", tmp_path / "shards", shard_bytes=2000, workers=1, log=lambda *_: None)
    shard = min((tmp_path / "shards").glob("*.tar"))
    catalog = ShardCatalog(tmp_path / "shards")
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(BadSample, match="not a regular file"):
        catalog.read(0)


_BLOCKED_READ = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from terabrain.data.batch_stream import BatchStream
    from terabrain.data.order import SampleOrder
    from terabrain.errors import TrainingError

    class BlockedFileSystem:
        # Reads from a FIFO that no one writes to, opened blocking: the kernel keeps the
        # thread waiting, as a hung network file system would.
        per_sample = 1

        def __call__(self, index, epoch):
            if index >= 4:
                with open({fifo!r}, "rb") as stream:
                    stream.read()
            return np.full((1, 4), index, np.float32)

    stream = BatchStream(BlockedFileSystem(), SampleOrder(16, 4, seed=0), workers=2,
                         timeout_s=1.0)
    began = time.monotonic()
    try:
        for step in range(4):
            stream.batch(step)
    except TrainingError as error:
        print(f"stopped after {{time.monotonic() - began:.1f}} s: {{error}}")
        stream.close()
        sys.exit(1)
""")


def test_a_read_blocked_in_the_kernel_does_not_outlive_the_timeout(tmp_path):
    """The loader gives up after read_timeout_s, and the process then exits although two of
    its threads are still blocked in a read that nothing will ever answer."""
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    # A process that did not exit would run into this timeout (generous: importing torch on
    # a busy machine alone can take tens of seconds, so the stop is timed inside the process).
    result = subprocess.run([sys.executable, "-c", _BLOCKED_READ.format(repo=str(REPO),
                                                                         fifo=str(fifo))],
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 1, result.stderr
    assert "read_timeout_s" in result.stdout
    stopped_after = float(re.search(r"stopped after ([0-9.]+) s", result.stdout).group(1))
    assert stopped_after < 15  # read_timeout_s is 1 s
