"""The streaming loader on collections the tests write (with damaged files): every readable
example once per epoch, across 1 and 2 real gloo ranks, and each damaged one replaced by the
next readable example of the rank's order, so every batch is full; a resumed epoch continues
where it stopped, through a real DCP checkpoint; bad files skipped and counted, or the run
stops naming the file; never a hang."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from collections_for_tests import image_id, recording_trainer, write_folder
from conftest import SCRIPTS, torchrun
from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.data.sources import data_config
from terabrain.data.catalogs import FolderCatalog
from terabrain.data.decode import BadSample
from terabrain.data.examples import ArrayExamples
from terabrain.data.order import SampleOrder
from terabrain.data.batch_stream import BatchStream
from terabrain.data.streamed_source import StreamSource
from terabrain.errors import TrainingError
from terabrain.nn.autoencoder import RICA
from terabrain.objectives import RICAObjective
from terabrain.train.checkpoint import CheckpointManager, restore
from terabrain.train.stage import build_trainer

GOOD = 39  # + 3 damaged = 42 entries; 2 held out -> 40 training entries, 5 batches of 8


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collection") / "images"
    write_folder(root, GOOD)
    return root


def catalog_image_ids(root: Path) -> dict[int, int | None]:
    """Catalog index -> image id it holds (None for a damaged file)."""
    catalog = FolderCatalog(root)
    ids = {}
    for index, path in enumerate(catalog.paths):
        match = re.search(r"img(\d+)\.", path)
        ids[index] = int(match.group(1)) if match else None
    return ids


def config(root: Path, **changes):
    settings = dict(source="folder", root=root, crop_size=16, remove_mean=False, whitening="none",
                    holdout_patches=2, workers=2)
    settings.update(changes)
    return data_config(**settings)


def damaged_in_training(root: Path, source: StreamSource) -> int:
    ids = catalog_image_ids(root)
    return sum(1 for i in source.train_ids if ids[int(i)] is None)


def expected_training_images(root: Path, source: StreamSource) -> set[int]:
    ids = catalog_image_ids(root)
    return {ids[int(i)] for i in source.train_ids if ids[int(i)] is not None}


def batch_with_replacements(stream: BatchStream, ids: dict, step: int) -> list[int]:
    """The images the rank's batch of ``step`` must show: its own, each damaged one replaced
    by the next readable image of the rank's later steps in the epoch (wrapping round)."""
    per, first = stream.order.per_epoch, stream.order.epoch(step) * stream.order.per_epoch
    later = [ids[int(i)] for k in range(1, per) for i in stream.local_ids(first + (step - first + k) % per)]
    later = [image for image in later if image is not None]
    return [ids[int(i)] if ids[int(i)] is not None else later.pop(0) for i in stream.local_ids(step)]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_every_readable_image_once_per_epoch_damaged_ones_replaced_and_counted(collection, kind):
    source = StreamSource(config(collection, worker_kind=kind), seed=3)
    stream = source.open(8, None, torch.device("cpu"))
    assert stream.order.per_epoch == 5
    expected = expected_training_images(collection, source)
    damaged = damaged_in_training(collection, source)
    assert len(expected) + damaged == 40 and damaged > 0
    ids = catalog_image_ids(collection)
    batches = {}
    for step in range(10):
        batches[step] = [image_id(row) for row in stream.batch(step)[0].numpy()]
        assert batches[step] == batch_with_replacements(stream, ids, step)
        assert len(batches[step]) == 8, "a damaged image leaves no hole in its batch"
    epochs = [[i for s in range(e * 5, e * 5 + 5) for i in batches[s]] for e in (0, 1)]
    for seen in epochs:
        assert set(seen) == expected and len(seen) == 40
        assert (Counter(seen) - Counter(expected)).total() == damaged  # the replacements
    assert epochs[0] != epochs[1], "each epoch has its own order"
    # Each damaged training file once per epoch; README.txt is unusable (not an image name).
    assert stream.metrics() == {"data_skipped": 2.0 * damaged, "data_unusable": 1.0, "data_batch": 8.0}
    stream.close()
    # Same seed, fresh stream: the same batches (deterministic for a given seed and epoch).
    again = source.open(8, None, torch.device("cpu"))
    assert [image_id(r) for r in again.batch(7)[0].numpy()] == batches[7]
    again.close()


def test_seed_000_blocks_keep_each_batch_inside_one_block(collection):
    source = StreamSource(config(collection, block_size=16), seed=0)
    stream = source.open(8, None, torch.device("cpu"))
    assert stream.order.per_epoch == 4  # 40 // 16 blocks, two batches each
    position = {int(c): p for p, c in enumerate(source.train_ids)}
    covered = []
    for step in range(4):
        members = [position[int(i)] for i in stream.local_ids(step)]
        assert len({m // 16 for m in members}) == 1, "a batch is drawn from one block"
        covered += members
    assert len(covered) == len(set(covered)) == 32
    assert {m // 16 for m in covered} == {0, 1}  # both whole blocks, the last 8 entries left out
    stream.close()


def test_fail_mode_names_the_file(collection):
    with pytest.raises(TrainingError, match=r"README\.txt.*on_error is fail"):
        StreamSource(config(collection, on_error="fail"), seed=1)
    root = collection.parent / "only-images"
    write_folder(root, 12, damaged=False)
    (root / "zz-truncated.jpg").write_bytes((root / "part0" / "img000.jpg").read_bytes()[:200])
    source = StreamSource(config(root, on_error="fail", holdout_patches=1), seed=0)
    stream = source.open(4, None, torch.device("cpu"))
    with pytest.raises(BadSample, match=r"zz-truncated\.jpg.*on_error is fail"):
        for step in range(stream.order.per_epoch):
            stream.batch(step)
    stream.close()


class _Hanging:
    """A reader whose file system stops answering after a few examples."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.per_sample = 1

    def __call__(self, index: int, epoch: int) -> np.ndarray:
        if index >= 8:
            time.sleep(1.5)
        return self.rows[index : index + 1]


def test_a_hanging_read_stops_the_run_instead_of_waiting_forever():
    rows = np.random.default_rng(0).random((16, 4), dtype=np.float32)
    stream = BatchStream(_Hanging(rows), SampleOrder(16, 4, seed=0), workers=2, timeout_s=0.3)
    began = time.monotonic()
    with pytest.raises(TrainingError, match="read_timeout_s"):
        for step in range(4):
            stream.batch(step)
    assert time.monotonic() - began < 10
    stream.close()


def _trainer(x, batches=None, steps=6):
    model = RICA(x.shape[1], 6, seed=1)
    return build_trainer(model, RICAObjective(0.1, 0.01),
                         optimizer=OptimizerConfig(name="adam", lr=0.01),
                         train=TrainConfig(steps=steps, batch_size=8), seed=5,
                         inputs=None if batches else x, batches=batches)


def test_streamed_array_trains_exactly_like_the_in_memory_tensor(tmp_path):
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((40, 12)).astype(np.float32))
    np.save(tmp_path / "x.npy", x.numpy())
    memory = _trainer(x)
    memory.fit()
    array = np.load(tmp_path / "x.npy", mmap_mode="r")
    stream = BatchStream(ArrayExamples(array, "x.npy"), SampleOrder(40, 8, seed=5), workers=2)
    streamed = _trainer(x, stream)
    streamed.fit()
    for a, b in zip(memory.model.parameters(), streamed.model.parameters()):
        assert torch.equal(a, b)


def test_resumed_epoch_continues_through_a_checkpoint(collection, tmp_path):
    source = StreamSource(config(collection), seed=4)

    def run(steps, manager, resume=False):
        seen = {}
        trainer = recording_trainer(source.open(8, None, torch.device("cpu")), seen, manager,
                                    steps=steps, batch_size=8, checkpoint_every=3, units=6,
                                    model_seed=1, seed=4)
        if resume:
            restore(manager.latest(), trainer)
        trainer.fit()
        return trainer, seen

    whole, whole_seen = run(8, CheckpointManager(tmp_path / "a"))
    manager = CheckpointManager(tmp_path / "b")
    _, first = run(3, manager)  # stops after the checkpoint at step 3, mid-epoch
    resumed, second = run(8, manager, resume=True)
    assert sorted(first) == [0, 1, 2] and sorted(second) == [3, 4, 5, 6, 7]
    assert {**first, **second} == whole_seen  # replacements included
    assert all(len(images) == 8 for images in whole_seen.values())
    epoch = [i for s in range(5) for i in {**first, **second}[s]]
    damaged = damaged_in_training(collection, source)
    assert damaged and set(epoch) == expected_training_images(collection, source)
    assert len(epoch) - len(set(epoch)) == damaged, "only the replacements repeat within the epoch"
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    # The skip counter continues across the restart instead of starting again from zero.
    assert resumed.batches.metrics()["data_skipped"] == whole.batches.metrics()["data_skipped"]


def test_two_gloo_ranks_split_every_epoch_and_resume_mid_epoch(collection, tmp_path):
    result = torchrun(2, str(SCRIPTS / "stream_ranks.py"), str(collection), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    ids = catalog_image_ids(collection)
    expected = Counter(ids[i] for i in ranks[0]["train_ids"] if ids[i] is not None)
    assert ranks[0]["per_epoch"] == 5
    damaged = sum(1 for i in ranks[0]["train_ids"] if ids[i] is None)
    for epoch in range(2):
        both = Counter(ranks[0]["epochs"][epoch]) + Counter(ranks[1]["epochs"][epoch])
        assert set(both) == set(expected), f"epoch {epoch}: each readable image across the two ranks"
        assert both.total() == 40 and (both - expected).total() == damaged  # damaged ones replaced
        # A replacement comes from the same rank's order: the ranks still read disjoint images.
        assert not set(ranks[0]["epochs"][epoch]) & set(ranks[1]["epochs"][epoch])
    # The counters are global (both ranks report the same totals); every batch is full.
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["data_skipped"] == 2.0 * damaged
    assert ranks[0]["metrics"]["data_batch"] == 8.0
    for rank in ranks:
        assert rank["resumed_at"] == 4
        steps = {int(k): v for k, v in {**rank["first"], **rank["second"]}.items()}
        assert sorted(steps) == list(range(7))
        assert sorted(int(k) for k in rank["second"]) == [4, 5, 6]
    # Across ranks and the restart, epoch 0 (steps 0-4) still holds each image once.
    epoch0 = Counter()
    for rank in ranks:
        steps = {int(k): v for k, v in {**rank["first"], **rank["second"]}.items()}
        epoch0 += Counter(i for s in range(5) for i in steps[s])
        assert all(len(steps[s]) == 4 for s in steps), "each rank's half of every batch is full"
    assert set(epoch0) == set(expected) and (epoch0 - expected).total() == damaged
