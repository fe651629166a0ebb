"""Exact top-k over latents split across the model axis (the TopK sparse autoencoder,
terabrain.nn.topk_sae, placed by the hidden-unit plan).

Each rank holds a contiguous block of latents, so its pre-activations are the
(rows, latents / m) columns of the whole (rows, latents) matrix. The selection of one process
is the top-k in the total order (value descending, latent index ascending)
(terabrain.nn.topk_sae.ordered_topk). In a total order, the global top-k restricted to one
rank's block is a prefix of that block's own top-k, so:

1. each rank takes its local top-min(k, block) in that order (candidates, sorted);
2. the candidates' values are all-gathered, rank after rank: position in the gathered row
   orders equal values exactly as their latent indices do (blocks are contiguous and each
   rank sorted its ties by index), so no index travels;
3. every rank ranks the gathered candidates with the same rule and counts how many of the
   global top-k are its own: its first that-many candidates fire.

The result is the single-process mask bit for bit, ties included, for any number of ranks.
Traffic per rank: one all-gather of rows x min(k, block) values, (m - 1) of those blocks
sent in a ring; the reconstruction (a sum over latents) is then a partial sum completed by
the plan's all-reduce, as for the other hidden-unit learners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from terabrain.nn.topk_sae import ordered_topk, selection_mask, selection_rows


def sharded_topk_counts(local_rows: torch.Tensor, k: int, group, rank: int, ranks: int):
    """For this rank's block ``local_rows`` (rows, n_local) of a row-wise top-``k`` over all
    ranks' blocks: ``(mask, kth)``, the boolean mask of its own selected entries and the
    k-th largest value of each row (rows, 1), equal on every rank."""
    local_k = min(k, local_rows.shape[1])
    values, positions, _ = ordered_topk(local_rows, local_k)
    gathered = [torch.empty_like(values) for _ in range(ranks)]
    dist.all_gather(gathered, values.contiguous(), group=group)
    candidates = torch.cat(gathered, dim=1)  # rank-major: the global tie order
    top, _, chosen = ordered_topk(candidates, min(k, candidates.shape[1]))
    mine = chosen[:, rank * local_k:(rank + 1) * local_k].sum(dim=1, keepdim=True)
    firing = torch.arange(local_k, device=local_rows.device).unsqueeze(0) < mine
    mask = torch.zeros_like(local_rows, dtype=torch.bool).scatter_(1, positions, firing)
    return mask, top[:, -1:]


class ShardedTopK:
    """The selection of terabrain.nn.topk_sae.ExactTopK for pre-activations sharded by
    latent (a DTensor placed ``Shard(1)`` on the 1-D model mesh)."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank, self.ranks = mesh.get_local_rank(), mesh.size()

    def __call__(self, pre: torch.Tensor, k: int, per_example: bool):
        if not isinstance(pre, DTensor):
            raise TypeError("ShardedTopK expects pre-activations sharded by latent (a DTensor)")
        local = pre.to_local().detach()
        rows = selection_rows(local, per_example)
        if not per_example:
            # latent-major flattening keeps each rank's block contiguous in the global order
            rows = rows.contiguous()
        chosen, kth = sharded_topk_counts(rows, k, self.group, self.rank, self.ranks)
        mask = selection_mask(chosen, local, per_example)
        return (DTensor.from_local(mask, self.mesh, [Shard(1)], run_check=False),
                DTensor.from_local(kth, self.mesh, [Replicate()], run_check=False))

    def __getstate__(self):  # process groups do not pickle (Hogwild is refused anyway)
        raise TypeError("a sharded selection cannot be pickled")
