"""Checkpoints written with torch.distributed.checkpoint (DCP), atomically, loaded safely.

Layout: ``checkpoints/step_<N>/`` (DCP files: one shard per rank plus ``.metadata``) and
``checkpoints/latest`` (a one-line file naming the newest complete checkpoint).

Atomicity: a checkpoint is written into ``.step_<N>.partial/``, its files fsynced, then
renamed to ``step_<N>`` (a rename is atomic on POSIX file systems) and only then is
``latest`` replaced (write a temporary file, fsync, ``os.replace``). A kill at any moment
leaves either the old or the new checkpoint complete and named by ``latest``; leftover
``.partial`` directories are removed by the next save.

Safety: DCP stores its metadata with pickle. Loading goes through ``SafeFileSystemReader``,
whose unpickler accepts only DCP's own metadata classes and a few torch value types, so a
tampered checkpoint cannot run code. Tensor data is read by DCP with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from terabrain.errors import TrainingError
from terabrain.files import fsync_dir, write_text_atomically
from terabrain.parallel.launch import is_main_rank
from terabrain.train.optim import optimizer_state_template

_STEP_DIR = re.compile(r"^step_(\d+)$")

_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch", "strided"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}
_ALLOWED_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _ALLOWED_MODULES and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type):  # metadata classes only, never a function
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a checkpoint never "
            "contains; refusing to load it"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """A DCP reader that never unpickles arbitrary objects."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with open(self._get_metadata_path(rank), "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("checkpoint metadata is not DCP metadata")
        # DCP reads non-tensor ("bytes") entries with torch.load(weights_only=False); our
        # checkpoints hold tensors only, so any such entry means a tampered checkpoint.
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise pickle.UnpicklingError(
                    f"checkpoint entry {key!r} is not a tensor; terabrain checkpoints hold "
                    "tensors only, refusing to load it"
                )
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata




def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and finds checkpoints in one directory, keeping the newest ``keep``."""

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> Path | None:
        """The newest complete checkpoint. Only complete checkpoints carry a ``step_<N>``
        name, so this is the highest such step; the ``latest`` file says the same for
        people and scripts, and may lag by one if a kill came between rename and update."""
        complete = [s for s in self.steps() if (self.directory / f"step_{s}/.metadata").is_file()]
        return self.directory / f"step_{complete[-1]}" if complete else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (nested dicts of tensors) as checkpoint ``step`` on every rank."""
        final = self.directory / f"step_{step}"
        partial = self.directory / f".step_{step}.partial"
        if is_main_rank():
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(".step_*.partial"):
                shutil.rmtree(leftover, ignore_errors=True)
            if final.exists():
                # Only after a resume from an older checkpoint; move it aside so that the
                # name appears again only once the new one is complete.
                stale = self.directory / f".step_{step}.stale"
                os.rename(final, stale)
                shutil.rmtree(stale)
            partial.mkdir()
        _barrier()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial, sync_files=True))
        _barrier()
        if is_main_rank():
            fsync_dir(partial)
            os.rename(partial, final)
            fsync_dir(self.directory)
            write_text_atomically(self.directory / "latest", final.name + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep]:
            shutil.rmtree(self.directory / f"step_{step}", ignore_errors=True)


def read_metadata(path: Path) -> Metadata:
    return SafeFileSystemReader(path).read_metadata()


def saved_shapes(path: Path, prefix: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every tensor the checkpoint holds under ``prefix`` (flattened keys),
    for state whose shape only the checkpoint knows (optimizer history)."""
    return _shapes(read_metadata(path), prefix)


def _shapes(metadata: Metadata, prefix: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {
        key[len(prefix) :]: (entry.size, entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def template_from_metadata(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Plain empty tensors shaped like the checkpoint's entries under ``prefix``."""
    return {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in saved_shapes(path, prefix).items()}


def load(path: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (same structure as saved) in place from the checkpoint at ``path``.
    A damaged or tampered checkpoint is a TrainingError naming it."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path))
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        raise TrainingError(f"cannot load checkpoint {path}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    failures = getattr(error, "failures", None)  # CheckpointException: per-rank causes
    if failures:
        error = next(iter(failures.values()))
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def restore(path: Path, trainer: Any) -> None:
    """Load checkpoint ``path`` into a freshly built trainer (model, optimizer, step, RNG,
    callbacks). The optimizer's template comes from the checkpoint's own metadata, since a
    fresh optimizer has no state yet to be filled in place."""
    try:
        metadata = read_metadata(path)
        saved = set(metadata.state_dict_metadata)
        shapes = _shapes(metadata, "optimizer.")
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise TrainingError(f"cannot load checkpoint {path}: {_first_line(error)}") from error
    template = trainer.state_dict()
    template["optimizer"] = optimizer_state_template(trainer.model, shapes)
    if "trainer.cuda_rng" not in saved:
        template["trainer"].pop("cuda_rng", None)
    for callback in trainer.callbacks:
        # Callbacks whose state's shape depends on the run that saved it (error-feedback
        # residuals: one per rank of that run) say what to load from the saved shapes.
        fit = getattr(callback, "checkpoint_template", None)
        if fit is not None:
            name = type(callback).__name__
            template["callbacks"][name] = fit(trainer, _shapes(metadata, f"callbacks.{name}."))
    load(path, template)
    trainer.load_state_dict(template)
