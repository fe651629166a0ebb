"""Who may write into a run directory, and whether this command may (re)start the run in it.

Two runs writing into one directory interleave their metrics and overwrite each other's
checkpoints, and a run started with another configuration over an old one would silently
continue the old run's checkpoint. ``claim_run_directory`` prevents both before anything is
written:

  - **The lock.** Rank 0 holds an exclusive ``fcntl.flock`` on ``RUN/.terabrain.lock`` for the
    life of its process (the kernel drops it when the process ends, however it ends: a
    SIGKILL leaves no stale lock). A second run into the same directory finds it held and
    refuses. Rank 0 decides and every rank is told (one broadcast), so all ranks refuse
    together and the run reports it once.
  - **What the directory holds.** ``--out DIR`` on a directory that holds a run: a finished
    run, or one of another configuration, is refused with what to do instead; an unfinished
    run of the same configuration continues (re-running the same command after a crash).
    ``--resume DIR --set ...`` and ``--resume-if-exists`` may change only the fields in
    ``MAY_CHANGE_ON_RESUME`` (learning rate, steps, mesh, logging, checkpoint cadence):
    they do not change what the checkpoint holds. Shapes, the objective and the data would
    make the checkpoint mean something else, and are refused, naming the field.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch.distributed as dist

from terabrain.config.loader import load_experiment
from terabrain.config.schema import ExperimentConfig
from terabrain.errors import ConfigError, SharedConfigError

LOCK_NAME = ".terabrain.lock"

# Fields a resumed run may change (fnmatch patterns on dotted paths). Everything else shapes
# the model, the objective or the data, which the checkpoint was made with.
MAY_CHANGE_ON_RESUME = (
    "name", "description",
    "optimizer.lr", "supervised.optimizer.lr",
    "train.steps", "supervised.train.steps",
    "train.log_every", "train.progress", "train.histogram_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.preempt_signals",
    "train.early_stopping.*",
    "supervised.train.log_every", "supervised.train.progress", "supervised.train.histogram_every",
    "supervised.train.checkpoint_every", "supervised.train.keep_checkpoints",
    "supervised.train.early_stopping.*",
    "parallel.*", "device",
)
_SHOWN = "optimizer.lr, train.steps, parallel.*, device, train's logging and checkpointing"


@dataclass
class Claim:
    """This process's hold on the run directory (rank 0's lock file; None on other ranks)
    and whether the run in it has already finished."""

    lock: Any
    finished: bool

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock
            self.lock = None


def claim_run_directory(run_dir: Path, config: ExperimentConfig, resuming: bool) -> Claim:
    """Lock ``run_dir`` for this run and check that ``config`` may run in it. Every rank
    calls this; rank 0 decides, every rank gets the same answer. ``resuming``: the command
    asked to continue the run (--resume, or --resume-if-exists on an existing run).

    Raises SharedConfigError (on every rank, with the same message) when another run holds
    the directory, or the directory's run may not be started or continued with ``config``.
    Keep the returned Claim alive for as long as the run writes: dropping it unlocks."""
    lock, verdict = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        lock, verdict = _decide(run_dir, config, resuming)
    if dist.is_initialized():
        shared = [verdict]
        dist.broadcast_object_list(shared, src=0)
        verdict = shared[0]
    if verdict not in ("start", "finished"):
        if lock is not None:
            lock.close()
        raise SharedConfigError(verdict)
    return Claim(lock, verdict == "finished")


def _decide(run_dir: Path, config: ExperimentConfig, resuming: bool) -> tuple[Any, str]:
    """(the lock file, "start" | "finished" | the reason to refuse)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held for the whole run)
    except OSError as error:
        return None, f"--out {run_dir}: cannot create the run directory ({error.strerror})"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        return None, (f"{run_dir} is in use by another run ({holder} holds {LOCK_NAME}); "
                      "wait for it to end, or choose another --out")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    lock.flush()
    verdict = _check_contents(run_dir, config, resuming)
    return lock, verdict


def _check_contents(run_dir: Path, config: ExperimentConfig, resuming: bool) -> str:
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        return "start"
    try:
        stored = load_experiment(str(stored_path))
    except (ConfigError, OSError, ValueError) as error:  # damaged, or from another version
        return f"{stored_path} cannot be read back ({error}); choose another --out"
    changed = changed_fields(stored, config)
    finished = run_finished(run_dir, stored)
    if resuming:
        refused = [f for f in changed if not any(fnmatchcase(f, p) for p in MAY_CHANGE_ON_RESUME)]
        if refused:
            return (f"--set {refused[0]}: cannot change on resume (the checkpoint holds "
                    f"the shapes, objective and data); may change: {_SHOWN}; else use a new --out")
        return "finished" if finished and not changed else "start"
    if finished:
        return (f"--out {run_dir} holds a finished run; choose another --out for a new run "
                "(`terabrain analyze` looks at this one)")
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        return (f"--out {run_dir} holds a run of another configuration ({shown} differ); "
                "choose another --out, or continue that run with --resume and its own config")
    return "start"


def changed_fields(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Dotted paths of the fields whose values differ, in the config's order."""
    return _differences(old.model_dump(mode="json"), new.model_dump(mode="json"), "")


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            path = f"{prefix}{key}"
            found += _differences(old.get(key), new.get(key), path + ".")
        return found
    return [] if old == new else [prefix.rstrip(".")]


def run_finished(run_dir: Path, config: ExperimentConfig) -> bool:
    """Every stage of ``config`` is recorded in results.json."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    stages = ["features"] + (["supervised"] if config.supervised is not None else [])
    return isinstance(results, dict) and all(stage in results for stage in stages)
