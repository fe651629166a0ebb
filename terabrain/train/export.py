"""Exported weights (``model.safetensors``) written without a second copy of the model.

The safetensors layout is simple (an 8-byte header length, a JSON header of names, dtypes,
shapes and byte offsets, then the raw bytes), so rank 0 writes it itself, tensor by tensor
and, for a tensor split across the model axis, block by block: its own block from memory,
the other ranks' blocks received in pieces of at most ``PIECE_BYTES``. No rank ever holds
more than its shard plus one piece; ``safetensors.torch.save_file`` would first copy every
tensor into a bytes object (twice the model at the peak).

Above ``SHARD_PARAMETERS`` parameters the export is a sharded set, the way large published
checkpoints are laid out: ``model-00001-of-0000N.safetensors``, ... and
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map":
{name: file}}``). A file holds whole tensors up to ``SHARD_PARAMETERS`` parameters; a
larger tensor gets a file of its own. ``load_exported`` reads either form.

Files are created with the process's ordinary mode (0644 under the usual umask), like
every other file of a run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from terabrain.errors import TrainingError
from terabrain.files import ORDINARY_MODE, fsync_dir
from terabrain.parallel.launch import is_main_rank
from terabrain.tensor_files import load_tensors

SHARD_PARAMETERS = 2**30
PIECE_BYTES = 64 * 2**20
INDEX = "model.safetensors.index.json"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class _Entry:
    """One tensor of the export: its whole shape, and how to produce its bytes in row pieces."""

    def __init__(self, name: str, tensor: torch.Tensor):
        self.name = name
        self.tensor = tensor
        self.shape = list(tensor.shape)
        self.dtype = tensor.dtype
        self.nbytes = math.prod(self.shape) * tensor.element_size()
        self.numel = math.prod(self.shape)

    def pieces(self, writer: bool) -> Iterator[torch.Tensor | None]:
        """The tensor's bytes in order, as contiguous CPU row blocks (on the writing rank;
        None elsewhere). Every rank of the tensor's mesh iterates this together."""
        tensor = self.tensor
        if not isinstance(tensor, DTensor):
            whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if writer:
                yield whole.detach().cpu().contiguous()
            return
        local = tensor.to_local().detach()
        placement = tensor.placements[-1] if tensor.device_mesh.ndim else None
        if not isinstance(placement, Shard) or tensor.dim() == 0:
            if writer:
                yield local.cpu().contiguous()
            return
        group = tensor.device_mesh.get_group(tensor.device_mesh.ndim - 1)
        ranks = dist.get_world_size(group)
        rank = dist.get_rank(group)
        row_bytes = max(1, self.nbytes // max(1, self.shape[0]))
        if placement.dim == 0:  # each rank's block of rows, in rank order
            rows_per_rank = local.shape[0]
            step = max(1, PIECE_BYTES // row_bytes)
            for owner in range(ranks):
                for start in range(0, rows_per_rank, step):
                    stop = min(start + step, rows_per_rank)
                    if owner == 0:
                        if writer:
                            yield local[start:stop].cpu().contiguous()
                        continue
                    if rank == owner:
                        dist.send(local[start:stop].cpu().contiguous(),
                                  dist.get_global_rank(group, 0), group=group)
                    elif writer:
                        piece = torch.empty([stop - start, *self.shape[1:]], dtype=self.dtype)
                        dist.recv(piece, dist.get_global_rank(group, owner), group=group)
                        yield piece
            return
        # Sharded along a later dimension: each row block is gathered across the ranks.
        step = max(1, PIECE_BYTES // row_bytes)
        for start in range(0, self.shape[0], step):
            block = local[start:start + step].cpu().contiguous()
            gathered = [torch.empty_like(block) for _ in range(ranks)] if writer else None
            dist.gather(block, gathered, dst=dist.get_global_rank(group, 0), group=group)
            if writer:
                yield torch.cat(gathered, dim=placement.dim)


def _in_writing_group(tensor: torch.Tensor) -> bool:
    """Only rank 0's model group gathers a DTensor (data replicas hold the same); any other
    tensor is read on every rank (a row-split block's ``full_tensor`` is a collective)."""
    if not isinstance(tensor, DTensor) or not dist.is_initialized():
        return True
    group = tensor.device_mesh.get_group(tensor.device_mesh.ndim - 1)
    return 0 in dist.get_process_group_ranks(group)


def _header(entries: list[_Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": _DTYPES[entry.dtype], "shape": entry.shape,
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text


def _write_file(path: Path, entries: list[_Entry], writer: bool) -> None:
    """One safetensors file; the writer writes while every rank feeds the pieces."""
    temporary = path.with_name(f".{path.name}.tmp")
    stream = open(temporary, "wb") if writer else None
    try:
        if stream is not None:
            stream.write(_header(entries, {"format": "pt"}))
        for entry in entries:
            if not _in_writing_group(entry.tensor):
                continue
            for piece in entry.pieces(writer):
                if stream is not None:
                    stream.write(_raw(piece))
        if stream is not None:
            stream.flush()
            os.fsync(stream.fileno())
    finally:
        if stream is not None:
            stream.close()
    if writer:
        os.chmod(temporary, ORDINARY_MODE)
        os.replace(temporary, path)


def _groups(entries: list[_Entry], limit: int) -> list[list[_Entry]]:
    """Consecutive tensors in files of at most ``limit`` parameters (a larger tensor alone)."""
    groups: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.numel > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.numel
    return groups


def export_weights(model: torch.nn.Module, directory: Path, stem: str = "model",
                   shard_parameters: int = SHARD_PARAMETERS) -> list[Path]:
    """Write ``model``'s whole weights under ``directory`` as ``<stem>.safetensors`` or,
    above ``shard_parameters`` parameters, a sharded set with its index. A collective when
    the model is sharded: every rank calls it, rank 0 writes. Returns the files written."""
    directory = Path(directory)
    writer = is_main_rank()
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    entries = [_Entry(name, value) for name, value in model.state_dict().items()]
    total = sum(entry.numel for entry in entries)
    single = directory / f"{stem}.safetensors"
    if total <= shard_parameters:
        _write_file(single, entries, writer)
        written = [single]
    else:
        groups = _groups(entries, shard_parameters)
        written = [directory / f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
                   for i in range(1, len(groups) + 1)]
        for path, group in zip(written, groups):
            _write_file(path, group, writer)
        if writer:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: path.name for path, group in zip(written, groups)
                                    for e in group}}
            index_path = directory / f"{stem}.safetensors.index.json"
            temporary = index_path.with_name(f".{index_path.name}.tmp")
            temporary.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(temporary, index_path)
            written.append(index_path)
            if single.exists():  # an older single-file export of this stage
                single.unlink()
    if writer:
        fsync_dir(directory)
    if dist.is_initialized():
        dist.barrier()
    return written


class WholeWeights(Mapping):
    """The model's whole tensors by name, each gathered when first read (a collective for a
    sharded one: every rank reads the same names in the same order). What a picture of a
    split network needs, without gathering anything for the learners that need nothing."""

    def __init__(self, model: torch.nn.Module):
        self._state = model.state_dict()

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._state[name].detach()
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def exported(directory: Path, stem: str = "model") -> bool:
    directory = Path(directory)
    return (directory / f"{stem}.safetensors").is_file() or (
        directory / f"{stem}.safetensors.index.json").is_file()


def load_exported(directory: Path, stem: str = "model",
                  error: type[Exception] = TrainingError) -> dict[str, torch.Tensor]:
    """The tensors of an export written by ``export_weights`` (one file or a sharded set).
    Every file is checked before it is read (terabrain.tensor_files), and a sharded set's
    index may name only files beside it; a damaged export is ``error(one line)``."""
    directory = Path(directory)
    index = directory / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return load_tensors(directory / f"{stem}.safetensors", error)
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as failure:
        raise error(f"{index} is damaged: {type(failure).__name__}") from None
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise error(f"{index} is damaged: it names a file outside the export ({name!r:.80})")
        weights.update(load_tensors(directory / name, error, "part of the exported model"))
    return weights
