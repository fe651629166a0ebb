"""Top-k stimuli per neuron over a data set too large to hold activations for, and how
selective each neuron is, streamed in batches and, under torchrun, split across ranks.

Each rank takes a contiguous slice of the examples (``rank_slice``), keeps a running top-k per
neuron (values and global example indices) and running sums; the ranks then gather their
top-k lists and sum their statistics. Ties are broken towards the lower example index, so the
result does not depend on the number of ranks or the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from terabrain.analysis.activations import batched_activations


def rank_slice(count: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``count`` examples (sizes differ by at most 1)."""
    return slice(count * rank // world, count * (rank + 1) // world)


def merge_top_k(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (neuron): the ``k`` largest values with their indices, largest first; equal
    values in index order. Padding entries carry value -inf and index -1."""
    # Order by index first, then a stable sort by value keeps equal values in index order.
    padded = indices < 0
    by_index = torch.where(padded, torch.iinfo(torch.int64).max, indices).argsort(dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)


@dataclass
class NeuronStats:
    """Per neuron: top-k activations and their example indices, and running moments."""

    top_values: torch.Tensor  # (units, k), float64
    top_indices: torch.Tensor  # (units, k), int64, -1 where fewer than k examples were seen
    count: int
    total: torch.Tensor  # (units,), float64
    total_squares: torch.Tensor

    @classmethod
    def empty(cls, units: int, k: int) -> "NeuronStats":
        return cls(torch.full((units, k), -float("inf"), dtype=torch.float64),
                   torch.full((units, k), -1, dtype=torch.int64), 0,
                   torch.zeros(units, dtype=torch.float64), torch.zeros(units, dtype=torch.float64))

    @property
    def k(self) -> int:
        return self.top_values.shape[1]

    def update(self, activations: torch.Tensor, first_index: int) -> None:
        """Fold in a batch of activations (rows are examples ``first_index, ...``)."""
        batch = activations.double()
        indices = torch.arange(first_index, first_index + len(batch)).expand(batch.shape[1], -1)
        self.top_values, self.top_indices = merge_top_k(
            torch.cat([self.top_values, batch.T], dim=1),
            torch.cat([self.top_indices, indices], dim=1), self.k)
        self.count += len(batch)
        self.total += batch.sum(dim=0)
        self.total_squares += batch.pow(2).sum(dim=0)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def std(self) -> torch.Tensor:
        variance = self.total_squares / max(self.count, 1) - self.mean().pow(2)
        return variance.clamp_min(0.0).sqrt()

    def selectivity(self) -> torch.Tensor:
        """How far, in standard deviations, a neuron's top-k responses stand above its mean
        response: large for a neuron that answers strongly to a few examples only."""
        valid = self.top_indices >= 0
        top_mean = torch.where(valid, self.top_values, 0.0).sum(1) / valid.sum(1).clamp_min(1)
        return (top_mean - self.mean()) / self.std().clamp_min(1e-12)

    def gather_(self) -> None:
        """Combine every rank's statistics (a collective; every rank ends with the total)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        values = [torch.empty_like(self.top_values) for _ in range(world)]
        indices = [torch.empty_like(self.top_indices) for _ in range(world)]
        dist.all_gather(values, self.top_values)
        dist.all_gather(indices, self.top_indices)
        self.top_values, self.top_indices = merge_top_k(
            torch.cat(values, dim=1), torch.cat(indices, dim=1), self.k)
        sums = torch.cat([self.total, self.total_squares, torch.tensor([float(self.count)], dtype=torch.float64)])
        dist.all_reduce(sums)
        units = len(self.total)
        self.total, self.total_squares = sums[:units].clone(), sums[units : 2 * units].clone()
        self.count = int(sums[-1])


def neuron_stats(model: torch.nn.Module, x: torch.Tensor, layer: int = 1, k: int = 5,
                 batch_size: int = 1024) -> NeuronStats:
    """Statistics of every neuron of ``layer`` over the rows ``x``. Under an initialized
    process group each rank processes its ``rank_slice`` of ``x`` (every rank passes the same
    ``x``, or a memory map of it) and all ranks return the combined result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = rank_slice(len(x), rank, world)
    stats = None
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        activations = batched_activations(model, torch.as_tensor(x[start:stop]), layer, batch_size)
        if stats is None:
            stats = NeuronStats.empty(activations.shape[1], k)
        stats.update(activations, start)
    if stats is None:  # this rank's share is empty: learn the width from one example
        units = batched_activations(model, torch.as_tensor(x[:1]), layer).shape[1]
        stats = NeuronStats.empty(units, k)
    stats.gather_()
    return stats
