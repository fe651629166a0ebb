"""Shared by the pre-emption tests (tests/test_preemption.py, and under real srun and mpirun
in tests/test_launchers_real.py): a small run whose steps are slow enough to be signalled
in the middle, the command that starts or continues it, and the checks that a pre-empted
and resumed run equals the uninterrupted one.

The run is the default experiment scaled down: L-BFGS on the full batch (10 iterations per
step, a few tenths of a second per step on one core), no periodic checkpoints (so the only
checkpoint before the end is the one the pre-emption writes), model parallel on 2 ranks
(``MODEL_PARALLEL``): its collectives are DTensor's.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

STEPS = 24
SMALL_RUN = [
    f"train.steps={STEPS}", "train.checkpoint_every=0", "train.progress=false",
    "data.num_patches=4000", "data.holdout_patches=500", "data.whitening_fit_samples=4000",
    "model.hidden=64", "optimizer.max_iter=10",
]
MODEL_PARALLEL = ["parallel.model=2", "parallel.data=1", "parallel.timeout_s=120"]
EXIT_PREEMPTED = 75


def train_arguments(run_dir: Path, *overrides: str) -> list[str]:
    """``-m terabrain train --set ... --out RUN --resume-if-exists``: the command a requeued
    job runs each time; it starts the run, or continues it."""
    sets = [a for override in (*SMALL_RUN, *overrides) for a in ("--set", override)]
    return ["-m", "terabrain", "train", *sets, "--out", str(run_dir), "--resume-if-exists"]


def steps_logged(run_dir: Path) -> int:
    """The last step rank 0 has logged (it logs every step, after the step)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return steps[-1] if steps else 0


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout_s: float = 300) -> int:
    """Wait until the run has logged ``step``; returns the step logged then (at least it)."""
    deadline = time.monotonic() + timeout_s
    while (seen := steps_logged(run_dir)) < step:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before step {step}: "
                                 f"{process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the run did not reach step {step} in {timeout_s} s")
        time.sleep(0.02)
    return seen


def checkpoint_steps(run_dir: Path) -> list[int]:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in directory.glob("step_*")
                  if (p / ".metadata").is_file())


def check_preempted(run_dir: Path, seen: int, code: int, stderr: str, signal_name: str) -> int:
    """The pre-empted run exited with the documented code after one line, and its newest
    checkpoint holds every step that had been logged when the signal was sent (no step is
    lost) and at most two more (it stopped at the next step boundary; one more step may
    have ended between reading the log and the signal's arrival). Returns that step."""
    assert code == EXIT_PREEMPTED, stderr
    steps = checkpoint_steps(run_dir)
    assert steps, f"no checkpoint written; stderr:\n{stderr}"
    saved = steps[-1]
    assert seen <= saved <= seen + 2, (seen, saved, stderr)
    assert saved < STEPS, "the run finished before the signal: nothing was pre-empted"
    lines = [line for line in stderr.splitlines() if line.startswith("terabrain: pre-empted")]
    expected = (f"terabrain: pre-empted by {signal_name}: checkpoint of step {saved} written; "
                f"continue with `terabrain train --resume {run_dir}` or the same command with "
                f"--resume-if-exists (exit code {EXIT_PREEMPTED})")
    assert lines == [expected], stderr
    assert "Traceback" not in stderr, stderr
    assert not (run_dir / "model.safetensors").exists()
    return saved


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit for bit the uninterrupted run: final weights, and metrics.jsonl (every step once,
    the same losses)."""
    expected, got = load_file(str(reference / "model.safetensors")), load_file(
        str(run_dir / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs from the uninterrupted run"
    assert _losses(run_dir) == _losses(reference)
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["stage"] == "features"}


def child_with_rank(parent: int, rank: int, timeout_s: float = 60) -> int:
    """The pid of the process below ``parent`` (a launcher) whose environment says RANK=rank."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in _descendants(parent):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"-m" in _cmdline(pid):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no process with RANK={rank} below {parent}")


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found
