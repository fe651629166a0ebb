"""Node-local staging survives interruption: a real process copying a shard is killed with
SIGKILL mid-copy; the next start resumes from the partial file and verifies the checksum.
A damaged partial copy is detected and copied again; a shard whose source no longer matches
its checksum is never used from the stage directory."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from terabrain.data.pack import pack
from terabrain.data.shards import file_sha256, load_tables
from terabrain.data.staging import Stager

STAGE_SCRIPT = """
import sys
from pathlib import Path
from terabrain.data.shards import load_tables
from terabrain.data.staging import Stager
tables = load_tables(Path(sys.argv[1]))
stager = Stager(tables, Path(sys.argv[2]), range(len(tables)), source=Path(sys.argv[1]),
                chunk_bytes=4096, bytes_per_s=100_000).start()
stager.wait()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("staging")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):  # noise compresses badly: about 40 kB per image
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (200, 200), dtype=np.uint8)).save(buffer, "PNG")
        (images / f"n{index:02d}.png").write_bytes(buffer.getvalue())
    pack(images, base / "shards", shard_bytes=250_000, log=lambda *_: None)
    return base / "shards"


def _staged(stage: Path) -> Path:
    return next(p for p in stage.iterdir() if p.is_dir())


def test_a_killed_copy_resumes_and_is_verified(shards, tmp_path):
    stage = tmp_path / "nvme"
    process = subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(shards), str(stage)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        partial = None
        while time.monotonic() < deadline:
            found = list(stage.glob("*/.shard-000000.tar.partial"))
            if found and found[0].stat().st_size > 20_000:
                partial = found[0]
                break
            time.sleep(0.05)
        assert partial is not None, "the copy never started"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    copied = partial.stat().st_size
    tables = load_tables(shards)
    assert 0 < copied < tables[0].bytes and not (partial.parent / "shard-000000.tar").exists()

    stager = Stager(tables, stage, range(len(tables)), source=shards)
    assert stager.locate(0) == tables[0].path  # not staged yet: read from the source
    stager.start()
    assert stager.wait(timeout=300)
    assert stager.resumed_bytes >= copied and not stager.failed
    staged = _staged(stage)
    for index, table in enumerate(tables):
        assert stager.locate(index) == staged / table.path.name
        assert file_sha256(staged / table.path.name) == table.sha256
    assert not list(staged.glob(".*.partial"))

    # Another start trusts the verified copies without copying again.
    again = Stager(tables, stage, range(len(tables)), source=shards).start()
    assert again.wait(timeout=300) and again.copied_bytes == 0
    assert again.locate(1) == staged / tables[1].path.name


def test_a_damaged_partial_copy_is_copied_again(shards, tmp_path):
    tables = load_tables(shards)
    stage = tmp_path / "nvme"
    stager = Stager(tables[:1], stage, [0], source=shards)
    partial = stager.directory / f".{tables[0].path.name}.partial"
    partial.write_bytes(b"\0" * 5000)  # not the shard's first bytes
    stager.start()
    assert stager.wait(timeout=300) and not stager.failed
    # The rest appended to the damaged part, the checksum differs, then all of it again.
    assert stager.resumed_bytes == 5000
    assert stager.copied_bytes == (tables[0].bytes - 5000) + tables[0].bytes
    assert file_sha256(stager.locate(0)) == tables[0].sha256


def test_a_source_that_no_longer_matches_its_checksum_is_never_staged(shards, tmp_path):
    tables = load_tables(shards)
    table = tables[0]
    table.sha256 = "0" * 64  # what the index would say after the shard was changed
    stager = Stager([table], tmp_path / "nvme", [0], source=shards).start()
    assert stager.wait(timeout=300)
    assert 0 in stager.failed and stager.locate(0) == table.path
    assert not list(stager.directory.glob("shard-*"))
