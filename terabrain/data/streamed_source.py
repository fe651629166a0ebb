"""Collections too large for memory (image folders, tar shards, YFCC100M, ``.npy`` memory
maps): everything ``prepare_data`` does for them, except reading the training examples,
which a ``BatchStream`` does while training runs.

Held-out examples (for the filter statistics) are a seeded choice of at most a tenth of the
collection, read once here and never trained on. Whitening is fitted on a seeded sample of
training examples; both are deterministic for a given seed, like the in-memory path.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from terabrain.config.sections import LCNConfig
from terabrain.data.affine import ShardAffineOrder, assign_shards, node_shards
from terabrain.data.batch_stream import BatchStream, DaemonPool, ReplicaShare
from terabrain.data.catalogs import Catalog, ShardCatalog
from terabrain.data.contrast import normalize_contrast
from terabrain.data.decode import BadSample
from terabrain.data.examples import OUTSIDE_TRAINING
from terabrain.data.order import SampleOrder
from terabrain.data.patches import remove_patch_mean
from terabrain.data.sources import DataSection, source_of
from terabrain.data.staging import PLANNED_STEPS, Stager, copy_order
from terabrain.data.whitening import ZCA
from terabrain.errors import ConfigError, TrainingError
from terabrain.parallel.launch import LaunchEnv, detect_launch_env, is_main_rank

# A D x D whitening matrix above this many dimensions is too large to be useful here.
MAX_WHITENING_DIM = 4096


def _too_few_shards(shards: int, replicas: int, why: str) -> str:
    return (f"data.order: shard_affine over {shards} shards and parallel.data = {replicas} replicas "
            f"{why}; pack more, smaller shards (`terabrain data pack --shard-size`), use a smaller "
            "train.batch_size, or data.order global")


def _index_type(count: int) -> type:
    return np.uint32 if count < 1 << 32 else np.int64


class RowTransform:
    """What every batch goes through after decoding: per-example mean removal, local
    contrast normalization (``data.lcn``), whitening."""

    def __init__(self, remove_mean: bool, example_shape: tuple[int, ...],
                 lcn: Optional[LCNConfig], whitening: Optional[ZCA]):
        self.remove_mean, self.example_shape = remove_mean, example_shape
        self.channels = example_shape[2] if len(example_shape) == 3 else 1
        self.lcn, self.whitening = lcn, whitening

    def before_whitening(self, rows: np.ndarray) -> np.ndarray:
        if self.remove_mean:
            rows = remove_patch_mean(rows, self.channels)
        if self.lcn is not None:
            rows = normalize_contrast(rows, self.example_shape, self.lcn.kernel, self.lcn.sigma)
        return rows

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = self.before_whitening(rows)
        return self.whitening.apply(rows) if self.whitening is not None else rows


class StreamSource:
    """A prepared streamed collection: the reader, the training examples and the transform;
    ``open`` makes the per-rank ``BatchStream`` of a training stage.

    ``launch``: where this process sits (its local rank, the local world size and its host,
    ``node``), which node-local staging divides the copying by. The launcher's own variables,
    read by ``detect_launch_env``, when not given."""

    def __init__(self, config: DataSection, seed: int, launch: Optional[LaunchEnv] = None, replicas=None):
        self.config = config
        self.seed = seed
        self.launch = launch if launch is not None else detect_launch_env()
        self.source = source = source_of(config)
        self.catalog: Optional[Catalog] = source.catalog(config)
        # A sequence of (where, why); not copied: an index's problems are made on demand.
        self.problems = self.catalog.problems if self.catalog else []
        self.read = source.stream_reader(config, seed, self.catalog)
        where = source.location(config)
        if len(self.read) < 2:
            raise ConfigError(f"data.root: {where} holds {len(self.read)} usable example(s); "
                              f"at least 2 are needed" + self._problem_hint())
        if self.problems and config.on_error == "fail":
            name, reason = self.problems[0]
            raise TrainingError(f"{name}: {reason} (data.on_error is fail; "
                                f"{len(self.problems)} such problem(s) in the collection)")
        self._report_problems()
        rng = np.random.default_rng(seed)
        held = max(1, min(math.ceil(config.holdout_patches / self.read.per_sample), len(self.read) // 10))
        # Under shard_affine each replica owns shards from the start (assigned on the whole
        # collection), and its held-out examples and whitening sample come from them.
        self.replicas = replicas
        self.affine_owner: Optional[np.ndarray] = None
        if source.sample_order(config) == "shard_affine" and isinstance(self.catalog, ShardCatalog):
            if len(self.catalog.tables) < self._replica_count():
                raise ConfigError(_too_few_shards(len(self.catalog.tables), self._replica_count(),
                                                  "each replica needs at least one"))
            self.affine_owner = assign_shards(np.diff(self.catalog.starts), self._replica_count(), seed)
            holdout = self._affine_holdout(held)
        else:
            holdout = self._global_holdout(rng, held)
        self.example_shape = self.read.example_shape
        self.channels = self.example_shape[2] if len(self.example_shape) == 3 else 1
        whitening = None
        if config.whitening == "zca":
            if self.read.dim > MAX_WHITENING_DIM:
                raise ConfigError(
                    f"data.whitening: zca on {self.read.dim}-dimensional examples would need a "
                    f"{self.read.dim}x{self.read.dim} matrix; use data.patches_per_image, a small "
                    f"data.image_size, or data.whitening none")
            count = math.ceil(config.whitening_fit_samples / self.read.per_sample)
            if self.affine_owner is not None:
                whitening = self._affine_whitening(count)
            else:
                fit_ids = np.sort(rng.permutation(self.train_ids)[:count])
                sample = self._read_rows(fit_ids, "whitening fit")
                sample = RowTransform(config.remove_mean, self.example_shape, config.lcn, None)(sample)
                whitening = ZCA.fit(sample[: config.whitening_fit_samples], config.whitening_epsilon)
        self.whitening = whitening
        self._by_replica = None  # only needed at start-up
        self.transform = RowTransform(config.remove_mean, self.example_shape, config.lcn, whitening)
        self.holdout_x = torch.from_numpy(self.transform(holdout).astype(np.float32))
        self.stager: Optional[Stager] = None

    def _global_holdout(self, rng: np.random.Generator, held: int) -> np.ndarray:
        """A seeded choice from the whole collection; sets holdout_ids and train_ids."""
        permutation = rng.permutation(len(self.read))
        # Damaged files are never in the held-out set: more candidates are taken until it
        # has a readable example (at most half the collection is tried).
        holdout = self._read_rows(permutation[:held], "held-out set", allow_empty=True)
        while len(holdout) == 0 and held < max(len(self.read) // 2, 2):
            more = permutation[held : held + max(1, held)]
            held += len(more)
            holdout = self._read_rows(more, "held-out set", allow_empty=True)
        if len(holdout) == 0:
            raise TrainingError("no readable example for the held-out set" + self._problem_hint())
        self.holdout_ids = np.sort(permutation[:held])
        # Collection order: blocks read shards sequentially. 4 bytes an example, not 8: at
        # YFCC100M's scale this array is most of what a rank holds per image (docs/data.md).
        self.train_ids = np.sort(permutation[held:]).astype(_index_type(len(self.read)))
        return holdout

    def _replica_count(self) -> int:
        return self.replicas.size if self.replicas is not None else 1

    def _replica_examples(self, replica: int) -> np.ndarray:
        """The examples (ascending) of the shards ``replica`` owns."""
        if getattr(self, "_by_replica", None) is None:
            owner = self.affine_owner[self.catalog.shards_of(np.arange(len(self.read)))]
            order = np.argsort(owner, kind="stable")
            counts = np.bincount(owner, minlength=self._replica_count())
            self._by_replica = np.split(order, np.cumsum(counts)[:-1])
        return self._by_replica[replica]

    def _affine_holdout(self, held: int) -> np.ndarray:
        """Each replica's share of the held-out set, drawn (seeded) from its own shards: this
        rank reads only its replica's part, which is its ``holdout_x``. Every rank knows every
        replica's draw, so all agree on the training examples; how far each replica had to go
        past damaged files is the one thing they exchange."""
        count = self._replica_count()
        me = self.replicas.rank if self.replicas is not None else 0
        draws, takes = [], []
        for replica in range(count):
            mine = self._replica_examples(replica)
            draws.append(mine[np.random.default_rng([self.seed, 4, replica]).permutation(len(mine))])
            takes.append(min(len(mine), math.ceil(held * len(mine) / len(self.read))))
        draw, take = draws[me], takes[me]
        holdout = self._read_rows(draw[:take], "held-out set", allow_empty=True)
        while len(holdout) == 0 and take < len(draw) // 2:
            more = draw[take : take + max(1, take)]
            take += len(more)
            holdout = self._read_rows(more, "held-out set", allow_empty=True)
        if len(holdout) == 0:
            raise TrainingError("no readable example for the held-out set in this replica's shards"
                                + self._problem_hint())
        agreed = torch.zeros(count, dtype=torch.int64)
        agreed[me] = take
        if self.replicas is not None:
            dist.all_reduce(agreed, group=self.replicas.group)
        chosen = np.concatenate([d[: int(t)] for d, t in zip(draws, agreed)])
        self.holdout_ids = np.sort(chosen)
        training = np.ones(len(self.read), bool)
        training[chosen] = False
        self.train_ids = np.flatnonzero(training).astype(_index_type(len(self.read)))
        return holdout

    def _affine_whitening(self, count: int) -> ZCA:
        """ZCA fitted on a seeded sample of each replica's own training examples: each replica
        reads its part and the replicas add up their moments, so they all get one transform."""
        config = self.config
        replicas = self._replica_count()
        me = self.replicas.rank if self.replicas is not None else 0
        mine = np.intersect1d(self._replica_examples(me), self.train_ids)
        part = math.ceil(count / replicas)
        fit_ids = np.sort(mine[np.random.default_rng([self.seed, 5, me]).permutation(len(mine))[:part]])
        sample = self._read_rows(fit_ids, "whitening fit")
        sample = RowTransform(config.remove_mean, self.example_shape, config.lcn, None)(sample)
        sample = sample[: math.ceil(config.whitening_fit_samples / replicas)].astype(np.float64)
        moments = torch.from_numpy(np.concatenate([[len(sample)], sample.sum(axis=0), (sample.T @ sample).ravel()]))
        if self.replicas is not None:
            dist.all_reduce(moments, group=self.replicas.group)
        dim = sample.shape[1]
        moments = moments.numpy()
        return ZCA.from_moments(int(moments[0]), moments[1 : 1 + dim],
                                moments[1 + dim :].reshape(dim, dim), config.whitening_epsilon)

    def _problem_hint(self) -> str:
        if not self.problems:
            return ""
        return f" ({len(self.problems)} unusable, e.g. {self.problems[0][0]}: {self.problems[0][1]})"

    def _report_problems(self) -> None:
        if not self.problems or not is_main_rank():
            return
        print(f"terabrain: {len(self.problems)} unusable entr{'y' if len(self.problems) == 1 else 'ies'} "
              f"in the collection (counted as data_unusable):", file=sys.stderr)
        for name, reason in self.problems[:10]:
            print(f"  {name}: {reason}", file=sys.stderr)

    def _read_rows(self, ids: np.ndarray, purpose: str, allow_empty: bool = False) -> np.ndarray:
        def one(index: int):
            try:
                return self.read(int(index), OUTSIDE_TRAINING)
            except BadSample as bad:
                if self.config.on_error == "fail":
                    raise BadSample(bad.name, f"{bad.reason} (reading the {purpose}; data.on_error is fail)") from None
                return None

        pool = DaemonPool(max(1, self.config.workers), "terabrain-sample")
        try:
            rows = [r for r in pool.map(one, ids, timeout=self.config.read_timeout_s)
                    if r is not None]
        except TimeoutError:
            raise TrainingError(
                f"the {purpose} was not read within data.read_timeout_s = "
                f"{self.config.read_timeout_s:g} s (is the file system hanging?)") from None
        finally:
            pool.shutdown(wait=False)
        if not rows:
            if allow_empty:
                return np.zeros((0, self.read.dim), np.float32)
            raise TrainingError(f"no readable example for the {purpose}" + self._problem_hint())
        return np.concatenate(rows).astype(np.float32, copy=False)

    @property
    def per_sample(self) -> int:
        return self.read.per_sample

    def open(self, batch_size: Optional[int], parallel, device: torch.device) -> BatchStream:
        """This rank's stream for a stage with global batch ``batch_size`` (examples)."""
        config = self.config
        if batch_size is None:
            raise ConfigError("train.batch_size: a streamed collection needs a batch size "
                              "(null means the whole data set, which is not held in memory)")
        if batch_size % self.per_sample:
            raise ConfigError(f"train.batch_size ({batch_size}) must be a multiple of "
                              f"data.patches_per_image ({self.per_sample})")
        images = batch_size // self.per_sample
        replicas = parallel.data_ranks if parallel is not None else 1
        if images % replicas:
            raise ConfigError(f"train.batch_size: {images} images per batch do not divide among "
                              f"parallel.data = {replicas} replicas")
        if images > len(self.train_ids):
            raise ConfigError(f"train.batch_size ({batch_size}) needs {images} images per batch; "
                              f"the collection has {len(self.train_ids)} for training")
        if config.block_size is not None and (config.block_size % images or config.block_size > len(self.train_ids)):
            raise ConfigError(f"data.block_size ({config.block_size}) must be a multiple of the "
                              f"{images} images of a batch and at most the {len(self.train_ids)} "
                              "training images")
        if self.source.sample_order(config) == "shard_affine":
            order = self._affine_order(images, replicas)
        else:
            order = SampleOrder(len(self.train_ids), images, self.seed, config.block_size)
        data = parallel.data if parallel is not None else None
        share = ReplicaShare(data.rank, data.size) if data is not None else None
        reduce_sum = (lambda t: dist.all_reduce(t, group=data.group)) if data is not None else None
        stream = BatchStream(
            self.read, order, ids=self.train_ids, share=share, reduce_sum=reduce_sum,
            transform=self.transform, workers=config.workers, kind=config.worker_kind,
            prefetch=config.prefetch, timeout_s=config.read_timeout_s, on_error=config.on_error,
            device=device, per_sample=self.per_sample, unusable=len(self.problems),
        )
        if self.source.stage_dir(config) is not None and self.stager is None:
            self._start_staging(stream)
        stream.staging = self.stager
        return stream

    def _affine_order(self, images: int, replicas: int) -> ShardAffineOrder:
        catalog = self.catalog
        assert isinstance(catalog, ShardCatalog)  # the schema allows shard_affine with shards only
        try:
            owner = self.affine_owner if self.affine_owner is not None and replicas == self._replica_count() else None
            return ShardAffineOrder(catalog.shards_of(self.train_ids), len(catalog.tables),
                                    images, replicas, self.seed, owner=owner)
        except ValueError as error:
            raise ConfigError(_too_few_shards(len(catalog.tables), replicas,
                                              f"with {images} images per batch: {error}")) from None

    def _start_staging(self, stream: BatchStream) -> None:
        catalog = self.catalog
        assert isinstance(catalog, ShardCatalog)
        if isinstance(stream.order, ShardAffineOrder):
            need, local_rank, local_world = node_shards(stream, catalog, self.config.stage_dir,
                                                        self.launch.node)
        else:
            # Shards in the order the global batches first read them in this epoch's first
            # steps. Every rank of the node computes the same list (not its own share's reading
            # order), so that "every local_world-th shard of it" divides the copying between
            # them without overlap or gaps.
            steps = range(min(stream.order.per_epoch, PLANNED_STEPS))
            need = copy_order(
                (catalog.shards_of(stream.ids[stream.order.global_batch(step).numpy()])
                 for step in steps),
                range(len(catalog.tables)))
            local_rank, local_world = self.launch.local_rank, self.launch.local_world_size
        try:
            self.stager = Stager(
                catalog.tables, self.config.stage_dir, need, source=self.config.root,
                local_rank=local_rank, local_world=local_world,
            )
        except ValueError as error:
            raise ConfigError(f"data.stage_dir: {error}") from None
        except OSError as error:
            raise ConfigError(f"data.stage_dir: cannot use {self.config.stage_dir}: {error}") from None
        catalog.locate = self.stager.locate
        self.stager.start()
        if self.config.stage_wait:
            began = time.monotonic()
            self.stager.wait()
            if is_main_rank():
                print(f"terabrain: staged {len(self.stager.mine)} shards to {self.stager.directory} "
                      f"in {time.monotonic() - began:.1f} s ({len(self.stager.failed)} failed)",
                      file=sys.stderr)

    def close(self) -> None:
        if self.stager is not None:
            self.stager.stop()
            self.stager = None
        if isinstance(self.catalog, ShardCatalog):
            self.catalog.close()  # open shard descriptors; reopened if read again
