"""What a run does differently on a (data x model) mesh, gathered in one object the trainer
asks: which rows of a global batch are this replica's, how inputs enter a model-parallel
model, how gradients are synchronized across replicas, and how to read a sharded value.

A single process uses ``Parallelism(None)``, for which every method is the identity.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from terabrain.config.sections import ParallelConfig
from terabrain.parallel.compressors import build_compressor
from terabrain.parallel.data_parallel import DataParallel
from terabrain.parallel.exchange import GradientExchange, all_reduce_bytes
from terabrain.parallel.hidden_unit_plan import apply_hidden_unit_plan


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (its shard, or the whole tensor if plain)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value as a plain tensor. A collective for a sharded DTensor: every rank of
    its mesh must call it (so for a row-split block, terabrain.parallel.row_state)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Parallelism:
    def __init__(self, mesh: Optional[DeviceMesh], settings: Optional[ParallelConfig] = None):
        """``settings``: the ``parallel`` config section (mode, compression); None: its
        defaults (sync, uncompressed)."""
        settings = settings if settings is not None else ParallelConfig()
        self.mesh = mesh
        self.data = DataParallel.from_mesh(mesh)
        model_ranks = mesh.size(mesh.mesh_dim_names.index("model")) if mesh is not None else 1
        self.model_mesh = mesh["model"] if model_ranks > 1 else None
        self.mode = settings.mode
        self.exchange: Optional[GradientExchange] = None
        self.value_bytes = 0  # local SGD: bytes of the logged values' all-reduces
        if self.data is not None and self.mode == "sync":
            compressor = build_compressor(
                settings.compression, tau=settings.threshold_tau,
                proportion=settings.adaptive_proportion, error_feedback=settings.error_feedback,
            )
            tag = f"model{mesh.get_local_rank('model')}." if model_ranks > 1 else ""
            block_bytes = (round(settings.overlap_block_mb * 2**20) if settings.overlap
                           else None)
            self.exchange = GradientExchange(compressor, self.data.group, self.data.rank,
                                             self.data.size, mesh["data"], tag, block_bytes)

    @property
    def model_ranks(self) -> int:
        return self.model_mesh.size() if self.model_mesh is not None else 1

    @property
    def data_ranks(self) -> int:
        return self.data.size if self.data is not None else 1

    def parallelize(self, model: nn.Module, device: torch.device = torch.device("cpu")) -> nn.Module:
        """Apply the model-parallel plan (hidden units across the model axis), if any. A model
        built on the meta device is materialised shard by shard on ``device``."""
        if self.model_mesh is None:
            if _on_meta(model):
                model.to_empty(device=device)
                model.reset_parameters()  # the root initialises every parameter by name
            return model
        return apply_hidden_unit_plan(model, self.model_mesh, device)

    def watch(self, model: nn.Module) -> None:
        """Prepare ``model``'s gradients for ``synchronize`` (parallel.overlap: reduced while
        the backward pass runs)."""
        if self.exchange is not None:
            self.exchange.watch(model)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This replica's share of a global batch's row indices (same for a model group)."""
        return self.data.shard(rows) if self.data is not None else rows

    def inputs(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A batch as the model expects it: replicated over the model axis."""
        if tensor is None or self.model_mesh is None:
            return tensor
        return DTensor.from_local(tensor, self.model_mesh, [Replicate()], run_check=False)

    def synchronize(self, gradients: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Average gradients and logged values across data-parallel replicas, in place.
        Local SGD averages only the logged values here; its replicas step on their own
        gradients and average parameters every K steps (terabrain.parallel.localsgd)."""
        if self.data is None:
            return
        if self.exchange is not None:
            self.exchange.average_([local(t) for t in gradients], [local(t) for t in values])
        else:
            self.data.average_([local(t) for t in values])
            self.value_bytes += all_reduce_bytes(sum(v.numel() for v in values), 4, self.data.size)


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())
