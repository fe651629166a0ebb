"""Features of a data set for downstream use, written as ``.npy``.

Under torchrun each rank computes the rows of its ``rank_slice`` and writes them straight
into the one output file (a NumPy memory map that rank 0 creates), so no rank ever holds the
whole feature matrix and nothing is gathered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from terabrain.analysis.activations import batched_activations
from terabrain.analysis.topk import rank_slice


def model_rows(run, data, split: str) -> torch.Tensor:
    """The model's input rows for one split of an AnalysisData."""
    images = data.split(split).images
    if data.preprocessed:
        return run.from_prepared(torch.from_numpy(np.ascontiguousarray(images, np.float32)))
    return run.to_model_input(images)


def write_features(model: torch.nn.Module, rows: torch.Tensor, out: Path, layer: int = 1,
                   batch_size: int = 1024) -> tuple[int, int]:
    """Activations of ``layer`` for every row of ``rows`` into ``out`` (float32 .npy).
    Every rank calls this with the same ``rows``; returns the file's shape."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    units = batched_activations(model, rows[:1], layer).shape[1]
    shape = (len(rows), units)
    partial = out.with_name(out.name + ".partial")
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
    if world > 1:
        dist.barrier()
    share = rank_slice(len(rows), rank, world)
    target = np.lib.format.open_memmap(partial, mode="r+")
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        target[start:stop] = batched_activations(model, rows[start:stop], layer).numpy()
    target.flush()
    del target
    if world > 1:
        dist.barrier()
    if rank == 0:  # complete only now: a killed run leaves no half-written features.npy
        partial.replace(out)
    return shape
