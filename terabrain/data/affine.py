"""Shard-affine order (``data.order: shard_affine``): each data-parallel replica owns a
fixed set of shards for the whole run and reads only their examples, so node-local staging
needs to hold only the shards of that node's replicas.

Assignment: shards, largest first (by training examples; equal sizes in a seeded order),
each go to the replica that owns the fewest examples so far (the lowest-numbered on a
tie). It depends on the seed, the collection and the number of replicas only: every stage,
epoch and restart of a run sees the same assignment.

Epochs: replica ``r`` owns ``n_r`` examples and reads ``b`` per step (the global batch over
the replicas). Every replica takes the same number of steps per epoch,
``min_r(n_r) // b``, so ``used = per_epoch * b`` examples of each replica's share form the
epoch; the rest of a larger share waits. Which examples wait rotates: a replica's examples
are laid on a fixed seeded cycle and epoch ``e`` takes the ``used`` consecutive examples
starting at ``e * used`` (wrapping round), shuffled among themselves for that epoch. Within
an epoch no example appears twice; every example of a share is trained on at least once in
any ``ceil(n_r / used)`` consecutive epochs.

Like ``SampleOrder``, the global batch of a step is a pure function of (seed, epoch, step):
the replicas' batches laid side by side, so ``ReplicaShare`` hands each replica its own and
a restored run continues mid-epoch without repeating or skipping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from terabrain.data.staging import PLANNED_STEPS, copy_order


def assign_shards(counts: np.ndarray, replicas: int, seed: int) -> np.ndarray:
    """The owning replica of each shard (greedy, largest shards first)."""
    counts = np.asarray(counts, dtype=np.int64)
    tie = np.random.default_rng([1, seed % (1 << 63)]).permutation(len(counts))
    owner = np.empty(len(counts), dtype=np.int64)
    owned = np.zeros(replicas, dtype=np.int64)
    for shard in np.lexsort((tie, -counts)):  # last key is the primary one
        replica = int(np.argmin(owned))
        owner[shard] = replica
        owned[replica] += counts[shard]
    return owner


class ShardAffineOrder:
    """The global batch of each step, made of each replica's batch from its own shards.

    ``sample_shards[i]`` is the shard of training example ``i`` (a position in the stream's
    ``ids``); ``batch`` is the global batch in examples, a multiple of ``replicas``.
    """

    def __init__(self, sample_shards: np.ndarray, shards: int, batch: int, replicas: int, seed: int,
                 owner: Optional[np.ndarray] = None):
        sample_shards = np.asarray(sample_shards, dtype=np.int64)
        if shards < replicas:
            raise ValueError(f"{shards} shard(s) cannot give each of {replicas} replicas its own")
        if batch < replicas or batch % replicas:
            raise ValueError(f"a batch of {batch} does not divide among {replicas} replicas")
        counts = np.bincount(sample_shards, minlength=shards)
        # ``owner``: an assignment made before the held-out set was taken (StreamSource's),
        # so that the held-out set could come from each replica's own shards.
        self.owner = assign_shards(counts, replicas, seed) if owner is None else np.asarray(owner)
        self.replicas, self.seed = replicas, seed
        self.samples, self.batch = len(sample_shards), batch
        self.local_batch = batch // replicas
        sample_owner = self.owner[sample_shards]
        self.shares = [np.flatnonzero(sample_owner == r) for r in range(replicas)]
        smallest = min(len(share) for share in self.shares)
        self.per_epoch = smallest // self.local_batch
        if self.per_epoch == 0:
            raise ValueError(f"the smallest replica's shards hold {smallest} example(s), fewer "
                             f"than its {self.local_batch} per batch")
        self.used = self.per_epoch * self.local_batch
        # Each replica's fixed cycle: the order in which its examples take turns to wait.
        self._cycles = [share[np.random.default_rng([2, seed % (1 << 63), r]).permutation(len(share))]
                        for r, share in enumerate(self.shares)]
        self._cached: tuple[int, Optional[list[np.ndarray]]] = (-1, None)

    def shards_of(self, replica: int) -> np.ndarray:
        return np.flatnonzero(self.owner == replica)

    def dropped_per_epoch(self) -> int:
        """Examples that wait out each epoch, over all replicas."""
        return self.samples - self.used * self.replicas

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def epoch_samples(self, epoch: int, replica: int) -> np.ndarray:
        """Replica ``replica``'s examples of ``epoch``, in the order it reads them."""
        cycle = self._cycles[replica]
        window = cycle[(epoch * self.used + np.arange(self.used)) % len(cycle)]
        return window[np.random.default_rng([3, self.seed % (1 << 63), epoch, replica]).permutation(self.used)]

    def global_batch(self, step: int) -> torch.Tensor:
        """Example positions of the global batch of ``step``: replica 0's, then replica 1's ..."""
        epoch, position = divmod(step, self.per_epoch)
        cached = self._cached  # read once: the loader thread and the trainer's thread both ask
        if cached[0] != epoch:
            cached = self._cached = (epoch, [self.epoch_samples(epoch, r) for r in range(self.replicas)])
        start = position * self.local_batch
        return torch.from_numpy(np.concatenate([s[start : start + self.local_batch] for s in cached[1]]))


def node_shards(stream, catalog, stage_dir: Path, node: str) -> tuple[list[int], int, int]:
    """What staging copies under the shard-affine order: the shards of the replicas whose
    ranks share this stage directory (same host ``node``, as ``LaunchEnv.node`` names it, and
    same directory), in the order they are first needed; and this rank's place among those
    ranks, which divide the copying between them. A collective over all ranks (each tells its
    host, directory and replica)."""
    order: ShardAffineOrder = stream.order
    me = (f"{node}:{Path(stage_dir).resolve()}", int(stream.share.rank))
    if dist.is_initialized():
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        rank = dist.get_rank()
    else:
        everyone, rank = [me], 0
    peers = [i for i, (key, _) in enumerate(everyone) if key == me[0]]
    owned = {int(s) for key, replica in everyone if key == me[0] for s in order.shards_of(replica)}
    steps = range(min(order.per_epoch, PLANNED_STEPS))
    need = copy_order((catalog.shards_of(stream.ids[order.global_batch(step).numpy()]) for step in steps),
                      owned)
    return need, peers.index(rank), len(peers)
