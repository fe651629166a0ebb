"""Checkpoints written with torch.distributed.checkpoint (DCP), atomically, loaded safely.

Layout: ``checkpoints/step_<N>/`` (DCP files: one shard per rank plus ``.metadata``) and
``checkpoints/latest`` (a one-line file naming the newest complete checkpoint).

Atomicity: a checkpoint is written into ``.step_<N>.partial/``, its files fsynced, then
renamed to ``step_<N>`` (a rename is atomic on POSIX file systems) and only then is
``latest`` replaced (write a temporary file, fsync, ``os.replace``). A kill at any moment
leaves either the old or the new checkpoint complete and named by ``latest``; leftover
``.partial`` directories are removed by the next save.

Trust: each checkpoint carries ``MANIFEST.json`` (every file's size and SHA-256, written
last, before the rename; see checkpoint_manifest). ``CheckpointManager.restorable`` returns
the newest checkpoint that verifies and says in one line which newer ones it skipped.
Loading goes through ``SafeFileSystemReader`` (checkpoint_reader): an explicit list of
classes for the metadata pickle, storage paths kept inside the checkpoint, declared sizes
checked against the files before anything is allocated. Tensor data is read by DCP with
``weights_only=True``.

I/O errors during a save (a full disk, a quota, a file size limit) end the run with one
line naming the path and the cause; the partial directory is removed and the previous
checkpoint stays the latest.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from terabrain.errors import TrainingError
from terabrain.files import fsync_dir, write_text_atomically
from terabrain.parallel.launch import is_main_rank
from terabrain.train import checkpoint_manifest as manifest
from terabrain.train.checkpoint_reader import CheckpointRefused, SafeFileSystemReader
from terabrain.train.optim import optimizer_state_template

_STEP_DIR = re.compile(r"^step_(\d+)$")
_MESSAGE_LIMIT = 300


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gathered(value: Any) -> list[Any]:
    """``value`` from every rank (one collective), so that all ranks decide alike."""
    if not dist.is_initialized():
        return [value]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _from_main_rank(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: DCP wraps a writer's failure (per rank, sometimes in a
    wrapper object) in a CheckpointException."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        if isinstance(current, (tuple, list)):  # DCP's (exception, stack summary) pairs
            pending.extend(item for item in current if isinstance(item, BaseException))
            continue
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending.extend(failures.values())
        pending.extend([getattr(current, "exception", None), getattr(current, "exc", None),
                        getattr(current, "__cause__", None), getattr(current, "__context__", None)])
    return None


class _RecordingStream:
    """A file being written whose OS errors are remembered: torch's zip writer turns a failed
    write into ``unexpected pos ...``, losing the cause (a full disk, a quota)."""

    def __init__(self, stream: Any, path: Path, errors: list[OSError]):
        self._stream, self._path, self._errors = stream, path, errors

    def _recorded(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as error:
            if error.filename is None:
                error.filename = str(self._path)
            self._errors.append(error)
            raise

    def write(self, data: Any) -> int:
        return self._recorded(self._stream.write, data)

    def flush(self) -> None:
        self._recorded(self._stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _RecordingFileSystem(FileSystem):
    """DCP's file system, remembering every OS error its writes meet."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[OSError] = []

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        path = Path(path)
        try:
            with path.open(mode) as stream:
                yield _RecordingStream(stream, path, self.errors)
        except OSError as error:  # opening, or the flush when closing
            if error.filename is None:
                error.filename = str(path)
            self.errors.append(error)
            raise


def _describe_write_error(error: BaseException, where: Path, recorded: Sequence[OSError] = ()) -> str:
    """``PATH: cause`` for a failed write; the path is the file when the OS names it."""
    cause = _os_error(error)
    if cause is None and recorded:
        cause = recorded[0]
    if cause is not None:
        path = cause.filename or where
        reason = cause.strerror or os.strerror(cause.errno or errno.EIO)
        return f"{path}: {reason}"
    return f"{where}: {_first_line(error)}"


def _bounded(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


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
        name (and a manifest, written before the rename), so this is the highest such step;
        the ``latest`` file says the same for people and scripts, and may lag by one if a
        kill came between rename and update. Not verified: see ``restorable``."""
        complete = [s for s in self.steps()
                    if (self.directory / f"step_{s}" / manifest.MANIFEST).is_file()]
        return self.directory / f"step_{complete[-1]}" if complete else None

    def restorable(self) -> tuple[Path | None, str | None]:
        """The newest checkpoint that verifies (manifest, metadata, declared sizes) and, when
        newer ones did not, one line saying which and why. None when there is no checkpoint.
        A TrainingError (one line) when there are checkpoints and none verifies. Called on
        every rank; rank 0 checks and all ranks get its answer."""
        verdict: Any = None
        if is_main_rank():
            verdict = self._choose()
        chosen, note, failure = _from_main_rank(verdict)
        if failure:
            raise TrainingError(failure)
        return (Path(chosen) if chosen else None), note

    def _choose(self) -> tuple[str | None, str | None, str | None]:
        skipped: list[str] = []
        damaged: list[Path] = []
        for step in reversed(self.steps()):
            path = self.directory / f"step_{step}"
            try:
                manifest.verify(path)
                read_metadata(path)
            except (CheckpointRefused, OSError) as error:
                skipped.append(f"{path.name}: {_first_line(error)[:120]}")
                damaged.append(path)
                continue
            if not skipped:
                return str(path), None, None
            # Moved aside (kept for inspection): the run writes those steps again, and
            # nothing may mistake them for complete checkpoints meanwhile.
            for bad in damaged:
                os.rename(bad, self.directory / f".{bad.name}.damaged")
            return str(path), _bounded(
                f"checkpoint {'; '.join(skipped)} does not verify; resuming from {path.name} "
                "instead (the damaged one is kept as .step_N.damaged)"), None
        if not skipped:
            return None, None, None
        return None, None, _bounded(
            f"no checkpoint in {self.directory} verifies ({'; '.join(skipped)}); move the "
            "directory aside to start this stage over")

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (nested dicts of tensors) as checkpoint ``step`` on every rank.
        An I/O error on any rank is a TrainingError on every rank, naming the path and the
        cause; the partial directory is removed and the previous checkpoint stays the latest."""
        final = self.directory / f"step_{step}"
        partial = self.directory / f".step_{step}.partial"
        error: str | None = None
        if is_main_rank():
            try:
                self._prepare(partial, final, step)
            except OSError as failure:
                error = _describe_write_error(failure, partial)
        self._stop_if_failed(_gathered(error), partial)
        writer = dcp.FileSystemWriter(partial, sync_files=True)
        writer.fs = recording = _RecordingFileSystem()
        try:
            dcp.save(state, storage_writer=writer)
            digests = manifest.digest_rank_files(partial, _rank())
        except (Exception, CheckpointException) as failure:  # noqa: BLE001 (reported on every rank below)
            error, digests = _describe_write_error(failure, partial, recording.errors), {}
        outcomes = _gathered((error, digests))
        self._stop_if_failed([e for e, _ in outcomes], partial)
        if is_main_rank():
            try:
                known = {name: value for _, found in outcomes for name, value in found.items()}
                manifest.write_manifest(partial, known)
                fsync_dir(partial)
                os.rename(partial, final)
                fsync_dir(self.directory)
            except OSError as failure:
                error = _describe_write_error(failure, partial)
        self._stop_if_failed(_gathered(error), partial)
        if is_main_rank():
            try:
                write_text_atomically(self.directory / "latest", final.name + "\n")
            except OSError as failure:
                # The checkpoint is complete and found by its name; only the pointer for
                # people and scripts is stale, but the disk is in trouble: stop anyway.
                error = (f"checkpoint {final.name} is complete, but "
                         f"{_describe_write_error(failure, self.directory / 'latest')}")
            self._prune()
        error = next((e for e in _gathered(error) if e), None)
        if error:
            raise TrainingError(_bounded(error))
        return final

    def _prepare(self, partial: Path, final: Path, step: int) -> None:
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

    def _stop_if_failed(self, errors: list[str | None], partial: Path) -> None:
        error = next((e for e in errors if e), None)
        if error is None:
            return
        if is_main_rank():
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()  # nobody goes on (or retries) before the partial directory is gone
        previous = self.latest()
        keeps = f"the latest checkpoint is still {previous.name}" if previous else "no checkpoint was kept"
        raise TrainingError(_bounded(f"cannot write checkpoint {error}; removed the partial "
                                     f"checkpoint, {keeps}"))

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
    """One line on why ``error`` happened. torch's unpickling errors advise loading with
    ``weights_only=False``; that advice is never passed on about a checkpoint that holds
    something other than tensors."""
    failures = getattr(error, "failures", None)  # CheckpointException: per-rank causes
    if failures:
        error = next(iter(failures.values()))
        error = getattr(error, "exception", None) or getattr(error, "exc", None) or error
    text = str(error)
    if "weights_only" in text or "Weights only load failed" in text:
        return "the tensor data holds objects other than tensors; refusing to unpickle them"
    lines = [line for line in text.splitlines() if line.strip()]
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
