"""Checkpointing and exporting parameters that are split into blocks along one dimension,
a different block on each rank of the model axis, held as plain local tensors (the spatial
plan of terabrain.parallel.spatial_network: a locally connected layer's filters by output
location, its input-shaped bias by row, a dense layer's filters by hidden unit).

Why not DTensor: DTensor's ``Shard`` places blocks with ``torch.chunk`` sizes, while the
row blocks are set by the layers' geometry (``spatial.split_evenly`` over output rows, and a
location block is whole rows, so it cannot follow chunk sizes of ``rows x width``).
``RowShard`` tells torch.distributed.checkpoint (DCP) the true offset of each rank's block
through DCP's checkpointable protocol (the three dunder methods DTensor implements), so:

- DCP writes every rank's block (a plain tensor under the same key on every rank would be
  de-duplicated: all but one rank's rows silently lost);
- a checkpoint reloads into any other split, or into one process's whole tensors, since
  DCP reads whatever overlaps each requested block.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from terabrain.parallel.spatial import Rows, gather_rows


class RowShard(torch.Tensor):
    """This rank's block ``blocks[rank]`` along ``dim`` of a tensor tiled by ``blocks``.

    A tensor subclass only because DCP looks values up with ``isinstance(value, Tensor)``;
    as a tensor it is the local block (no torch function is overridden), while ``size()``
    and ``shape`` are the whole tensor's, which is what DCP compares with a checkpoint."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, local: torch.Tensor, dim: int, blocks: Sequence[Rows], rank: int,
                group: dist.ProcessGroup):
        return torch.Tensor._make_subclass(cls, local.detach(), False)

    def __init__(self, local: torch.Tensor, dim: int, blocks: Sequence[Rows], rank: int,
                 group: dist.ProcessGroup):
        start, stop = blocks[rank]
        if local.shape[dim] != stop - start:
            raise ValueError(f"block {blocks[rank]} of dim {dim} does not match the local "
                             f"shape {tuple(local.shape)}")
        # ``local`` itself (not a copy): DCP loads into it in place.
        self.local, self.dim, self.blocks, self.rank, self.group = local, dim, list(blocks), rank, group
        shape = list(local.shape)
        shape[dim] = blocks[-1][1]
        self.global_shape = torch.Size(shape)
        offsets = [0] * local.dim()
        offsets[dim] = start
        self.offsets = torch.Size(offsets)

    # --- what the rest of the code asks of a tensor-like value ---

    def size(self, dim: int | None = None):
        return self.global_shape if dim is None else self.global_shape[dim]

    @property
    def shape(self) -> torch.Size:
        return self.global_shape

    def to_local(self) -> torch.Tensor:
        return self.local

    def detach(self) -> "RowShard":
        return RowShard(self.local.detach(), self.dim, self.blocks, self.rank, self.group)

    def full_tensor(self) -> torch.Tensor:
        """The whole tensor on every rank (a collective over the model axis)."""
        return gather_rows(self.local.detach().contiguous(), self.blocks, self.group, self.dim)

    # --- DCP's checkpointable protocol ---

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(
            index=MetadataIndex(fqn, self.offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=self._chunk(),
                properties=TensorProperties.create_from_tensor(self.local),
                size=self.global_shape,
            ),
        )]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local

    def __repr__(self) -> str:
        return (f"RowShard(block {self.blocks[self.rank]} of dim {self.dim}, global "
                f"{tuple(self.global_shape)})")
