"""Shard-affine order (``data.order: shard_affine``): each replica reads only its own
shards, every example at most once per epoch with the documented drop rotating so none
starves, deterministic and resumable, refused where it cannot work; on 2 real gloo ranks
each rank's stage directory holds only its shards."""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from collections_for_tests import LEVEL_STEP, image_id, write_folder
from conftest import SCRIPTS, torchrun
from terabrain.data.sources import data_config
from terabrain.data.affine import ShardAffineOrder, assign_shards
from terabrain.data.catalogs import ShardCatalog
from terabrain.data.order import SampleOrder
from terabrain.data.pack import pack
from terabrain.data.streamed_source import StreamSource
from terabrain.errors import ConfigError

IMAGES = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 flat grey images (image i at level 4 i), stored uncompressed at three sizes so
    that the shards hold unequal numbers of images (9, 5, 5, 5, 5, 5, 6)."""
    base = tmp_path_factory.mktemp("affine")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        side = int(rng.choice([24, 40, 80]))
        buffer = io.BytesIO()
        Image.fromarray(np.full((side, side), LEVEL_STEP * index, np.uint8)).save(buffer, "PNG", compress_level=0)
        (images / f"img{index:03d}.png").write_bytes(buffer.getvalue())
    pack(images, base / "shards", shard_bytes=30_000, workers=1, log=lambda *_: None)
    return base / "shards"


def image_of(catalog: ShardCatalog, index: int) -> int:
    return int(re.search(r"img(\d+)\.png$", catalog.name(index)).group(1))


def config(root: Path, **changes):
    settings = dict(source="shards", root=root, order="shard_affine", crop_size=16,
                    remove_mean=False, whitening="none", holdout_patches=2, workers=2)
    settings.update(changes)
    return data_config(**settings)


# --- the order itself ---------------------------------------------------------------------

def test_assignment_is_balanced_and_a_function_of_the_seed():
    counts = np.array([9, 5, 5, 5, 5, 5, 6, 1, 12])
    owner = assign_shards(counts, 3, seed=7)
    owned = np.bincount(owner, weights=counts, minlength=3)
    assert set(owner) == {0, 1, 2}
    assert owned.max() - owned.min() <= counts.max() - counts.min()  # greedy's bound: within a shard
    assert np.array_equal(owner, assign_shards(counts, 3, seed=7))
    equal = np.full(12, 4)
    assert not all(np.array_equal(assign_shards(equal, 3, 0), assign_shards(equal, 3, s)) for s in range(1, 6))


def test_each_replica_reads_its_own_shards_once_per_epoch_and_the_drop_rotates():
    rng = np.random.default_rng(1)
    sample_shards = np.sort(rng.integers(0, 7, 101))  # uneven shards, as a collection has them
    order = ShardAffineOrder(sample_shards, 7, batch=12, replicas=3, seed=5)
    shares = [set(order.shares[r].tolist()) for r in range(3)]
    assert sorted(set().union(*shares)) == list(range(101)) and sum(map(len, shares)) == 101
    assert order.per_epoch == min(map(len, shares)) // 4
    waits = {r: math.ceil(len(shares[r]) / order.used) for r in range(3)}
    epochs = max(waits.values()) + 2
    seen = []
    for epoch in range(epochs):
        per_replica = [[] for _ in range(3)]
        for step in range(epoch * order.per_epoch, (epoch + 1) * order.per_epoch):
            rows = order.global_batch(step).numpy()
            assert len(rows) == 12
            for r in range(3):
                part = rows[r * 4 : (r + 1) * 4]
                assert set(sample_shards[part]) <= set(order.shards_of(r)), "a replica reads only its shards"
                per_replica[r] += part.tolist()
        everything = [i for part in per_replica for i in part]
        assert len(everything) == len(set(everything)), f"epoch {epoch}: an example twice"
        assert len(everything) == 101 - order.dropped_per_epoch()
        seen.append(per_replica)
    for r in range(3):  # any ceil(n_r / used) consecutive epochs cover the whole share
        for first in range(epochs - waits[r] + 1):
            covered = {i for e in range(first, first + waits[r]) for i in seen[e][r]}
            assert covered == shares[r], f"replica {r}: an example starved from epoch {first}"
    again = ShardAffineOrder(sample_shards, 7, batch=12, replicas=3, seed=5)
    assert all(torch.equal(order.global_batch(s), again.global_batch(s)) for s in (0, 5, 17))
    other = ShardAffineOrder(sample_shards, 7, batch=12, replicas=3, seed=6)
    assert not torch.equal(order.global_batch(0), other.global_batch(0))


def test_the_default_order_is_the_global_shuffle(shards):
    assert data_config(source="shards", root=shards).order == "global"
    source = StreamSource(config(shards, order="global"), seed=3)
    stream = source.open(8, None, torch.device("cpu"))
    assert isinstance(stream.order, SampleOrder)
    expected = SampleOrder(len(source.train_ids), 8, 3)
    assert all(torch.equal(stream.order.global_batch(s), expected.global_batch(s)) for s in range(6))
    stream.close()
    source.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_one_replica_streams_every_image_of_an_epoch_once(shards, kind):
    source = StreamSource(config(shards, worker_kind=kind), seed=2)
    catalog = source.catalog
    stream = source.open(8, None, torch.device("cpu"))
    order = stream.order
    assert order.per_epoch == len(source.train_ids) // 8
    for epoch in range(2):
        images = [image_id(r) for s in range(epoch * order.per_epoch, (epoch + 1) * order.per_epoch)
                  for r in stream.batch(s)[0].numpy()]
        assert len(images) == len(set(images)) == order.used
        assert set(images) <= {image_of(catalog, int(i)) for i in source.train_ids}
    stream.close()
    source.close()


# --- refusals -----------------------------------------------------------------------------

def test_refused_with_a_source_other_than_shards(tmp_path):
    write_folder(tmp_path / "images", 4, damaged=False)
    from terabrain.config.loader import validate
    from terabrain.errors import ConfigError

    # data.order is a field of the shards source only: elsewhere one line names the fields.
    with pytest.raises(ConfigError, match="data.order is not a field of data.source=folder"):
        validate({"data": {"source": "folder", "root": str(tmp_path / "images"),
                           "order": "shard_affine"}})
    with pytest.raises(ConfigError, match="data.order is not a field of data.source=photos"):
        validate({"data": {"source": "photos", "order": "shard_affine"}})


def test_refused_with_blocks(shards):
    with pytest.raises(ValidationError, match="data.order: shard_affine does not combine with data.block_size"):
        config(shards, block_size=16)


def test_refused_with_fewer_shards_than_replicas(shards):
    source = StreamSource(config(shards), seed=0)
    replicas = len(source.catalog.tables) + 1  # 8 replicas for 7 shards (no collective is run)
    with pytest.raises(ConfigError, match=r"data.order: shard_affine over 7 shards and parallel.data = 8"):
        source.open(8 * 2, SimpleNamespace(data_ranks=replicas, data=None), torch.device("cpu"))
    images = len(source.train_ids)  # 2 replicas owning unequal shares: the smaller is too small
    with pytest.raises(ConfigError, match=f"fewer than its {images // 2} per batch"):
        source.open(images, SimpleNamespace(data_ranks=2, data=None), torch.device("cpu"))
    source.close()


# --- two real ranks, with staging ---------------------------------------------------------

def test_two_gloo_ranks_read_and_stage_only_their_shards_and_resume(shards, tmp_path):
    result = torchrun(2, str(SCRIPTS / "affine_ranks.py"), str(shards), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    catalog = ShardCatalog(shards)
    names = [t.path.name for t in catalog.tables]
    train = [image_of(catalog, i) for i in ranks[0]["train_ids"]]
    per_epoch, used = ranks[0]["per_epoch"], ranks[0]["used"]
    assert ranks[1]["per_epoch"] == per_epoch and per_epoch >= 3

    # A fixed, disjoint assignment covering every shard; each rank read and staged only its own.
    assert sorted(ranks[0]["owned"] + ranks[1]["owned"]) == names
    assert not set(ranks[0]["owned"]) & set(ranks[1]["owned"])
    for rank in ranks:
        assert rank["staged"] == sorted(rank["owned"]), "the node-local copy holds only this rank's shards"
        for epoch in rank["shards_read"]:
            assert set(epoch) <= set(rank["owned_indices"])
    # Two ranks sharing one directory (one node): it holds both ranks' shards, each copied once.
    shared = sorted(p.name for p in (tmp_path / "shared").glob("*/*.tar"))
    assert shared == names
    assert sorted(ranks[0]["copied_to_shared"] + ranks[1]["copied_to_shared"]) == names

    # The held-out set and the whitening sample came from each replica's own shards: the
    # start-up read nothing else; the ranks agree on the split and on one ZCA transform.
    starts = [rank["startup"] for rank in ranks]
    for start in starts:
        assert start["touched"] and set(start["touched"]) <= set(start["owned"])
        assert start["holdout_rows"] >= 1
    assert not set(starts[0]["owned"]) & set(starts[1]["owned"])
    assert starts[0]["holdout_ids"] == starts[1]["holdout_ids"] and starts[0]["zca"] == starts[1]["zca"]
    assert starts[0]["train_ids"] == starts[1]["train_ids"]
    assert sorted(starts[0]["holdout_ids"] + starts[0]["train_ids"]) == list(range(len(catalog)))
    held_shards = set(catalog.shards_of(np.array(starts[0]["holdout_ids"])).tolist())
    assert held_shards & set(starts[0]["owned"]) and held_shards & set(starts[1]["owned"])

    # Every epoch: no image twice across ranks, the same count each, all drawn from training.
    dropped = len(train) - 2 * used
    assert 0 < dropped < len(train) // 2
    for epoch in range(3):
        both = ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch]
        assert len(both) == len(set(both)) == 2 * used
        assert set(both) <= set(train)
    shard_of = catalog.shards_of(np.array(ranks[0]["train_ids"]))
    for rank in ranks:
        share = int(np.isin(shard_of, rank["owned_indices"]).sum())
        assert math.ceil(share / used) <= 3
    # So three epochs cover each share: nothing starves.
    assert set().union(*(set(r["epochs"][e]) for r in ranks for e in range(3))) == set(train)

    # The resumed run: the same batches as an uninterrupted read, none repeated or skipped.
    for rank in ranks:
        assert rank["resumed_at"] == 3
        steps = {int(k): v for k, v in {**rank["first"], **rank["second"]}.items()}
        assert sorted(steps) == list(range(7))
        assert sorted(int(k) for k in rank["second"]) == [3, 4, 5, 6]
        flat = [i for e in rank["epochs"] for i in e]
        per_step = len(flat) // (3 * per_epoch)
        assert all(steps[s] == flat[s * per_step : (s + 1) * per_step] for s in range(7))
    epoch0 = Counter(i for rank in ranks for s in range(per_epoch) for i in
                     {**rank["first"], **rank["second"]}[str(s)])
    assert max(epoch0.values()) == 1 and sum(epoch0.values()) == 2 * used
