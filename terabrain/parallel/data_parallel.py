"""Synchronous data parallelism: each replica takes an equal share of every global batch, and
after the backward pass gradients (and the loss and its logged parts) are averaged across
replicas in one all-reduce, so every replica takes the same optimizer step.

Why not DistributedDataParallel: the trainer drives every optimizer through a closure, and
L-BFGS calls it several times per step and compares losses inside its line search. Averaging
inside the closure gives L-BFGS the global loss and gradient; DDP would give it only the
replica's own loss. One flat buffer per step keeps it to a single collective.

The average equals the single-process gradient of the global batch exactly in exact
arithmetic for every objective that is a mean over examples (RICA, reconstruction,
classification, regression). The sparse autoencoder's KL term uses each replica's own mean
activation over its share of the batch, so it differs slightly from the single-process value.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


class DataParallel:
    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, size: int):
        self.group = group
        self.rank = rank
        self.size = size

    @classmethod
    def from_mesh(cls, mesh: Optional[DeviceMesh]) -> Optional["DataParallel"]:
        if mesh is None or mesh.size(mesh.mesh_dim_names.index("data")) == 1:
            return None
        group = mesh.get_group("data")
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This replica's contiguous share of the global batch's row indices."""
        share = len(rows) // self.size
        return rows[self.rank * share : (self.rank + 1) * share]

    @torch.no_grad()
    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over replicas, in place, in one all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.size
        offset = 0
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset : offset + count].view_as(tensor))
            offset += count
