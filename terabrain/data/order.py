"""Which examples form each step's global batch: a pure function of (seed, epoch, step).

Plain order: a fresh permutation of all examples every epoch (the same generator as the
in-memory ``BatchOrder``, so a streamed array and an in-memory one give the same batches).
Block order (Ni et al. 2015: blocks of 960 images, five mini-batches of 192): the collection is
cut into consecutive blocks, the blocks are visited in a random order and the examples of
a block are shuffled among themselves. Reading a block touches a short stretch of one or two
shards, which is what makes it fast on a parallel file system.

The incomplete last batch (or block) of an epoch is left out, as in the in-memory path;
every other example is in exactly one batch per epoch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class SampleOrder:
    def __init__(self, samples: int, batch: int, seed: int, block: Optional[int] = None):
        if batch < 1 or batch > samples:
            raise ValueError(f"a batch of {batch} examples from a collection of {samples}")
        if block is not None and (block % batch or block > samples):
            raise ValueError(f"block of {block} for batches of {batch} from {samples} examples")
        self.samples = samples
        self.batch = batch
        self.seed = seed
        self.block = block
        if block is None:
            self.per_epoch = samples // batch
        else:
            self.per_epoch = (samples // block) * (block // batch)
        self._cached: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def global_batch(self, step: int) -> torch.Tensor:
        """Example indices of the global batch of ``step`` (int64)."""
        epoch, position = divmod(step, self.per_epoch)
        cached = self._cached  # read once: the loader thread and the trainer's thread both ask
        if cached[0] != epoch:
            count = self.samples if self.block is None else self.samples // self.block
            permutation = torch.randperm(count, generator=self._generator(epoch))
            if count < 1 << 31:  # kept for the epoch: 4 bytes an example instead of 8
                permutation = permutation.to(torch.int32)
            cached = self._cached = (epoch, permutation)
        if self.block is None:
            start = position * self.batch
            return cached[1][start : start + self.batch]
        per_block = self.block // self.batch
        which, inside = divmod(position, per_block)
        block = int(cached[1][which])
        shuffle = np.random.default_rng([self.seed, epoch, block]).permutation(self.block)
        start = inside * self.batch
        return torch.from_numpy(block * self.block + shuffle[start : start + self.batch])
