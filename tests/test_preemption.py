"""Pre-emption: a SIGTERM or SIGUSR1 stops the run at the next step boundary; every rank
writes the checkpoint of that step, one line is printed, the exit code is 75, and running
the same command again (``--out RUN --resume-if-exists``) finishes bit for bit like a run
that was never interrupted.

Real processes: one, and two ranks under torchrun (model parallel, DTensor collectives)
where only rank 1 receives the signal, so the ranks must agree on the step to stop at. The
same under real srun and mpirun: tests/test_launchers_real.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import REPO, clean_environ, torchrun
from preemption_runs import (
    MODEL_PARALLEL,
    assert_same_run,
    check_preempted,
    child_with_rank,
    train_arguments,
    wait_for_step,
)

from terabrain.errors import PREEMPTED_EXIT_CODE
from terabrain.train import preemption

TIMEOUT_S = 600


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], check=False, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=REPO, env=clean_environ())


def test_the_documented_exit_code():
    assert PREEMPTED_EXIT_CODE == 75


def test_a_handled_signal_is_only_noted_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR2)
    with preemption.watch_signals(["SIGUSR2"]):
        assert preemption.pending() is None
        signal.raise_signal(signal.SIGUSR2)
        assert preemption.pending() == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) == before and preemption.pending() is None


@pytest.mark.slow
def test_sigterm_in_one_process_checkpoints_the_step_and_the_rerun_finishes_identically(tmp_path):
    reference = tmp_path / "reference"
    _ok(_run(*train_arguments(reference)))
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, *train_arguments(run)], cwd=REPO,
                               env=clean_environ(), text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        seen = wait_for_step(run, 5, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    saved = check_preempted(run, seen, process.returncode, stderr, "SIGTERM")
    resumed = _ok(_run(*train_arguments(run)))  # the same command again
    assert f"resuming from {run / 'checkpoints' / f'step_{saved}'} (step {saved})" in resumed.stdout
    assert_same_run(run, reference)


@pytest.mark.slow
def test_sigusr1_to_one_of_two_torchrun_ranks_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    _ok(torchrun(2, *train_arguments(reference, *MODEL_PARALLEL)))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--max-restarts", "0",
               *train_arguments(run, *MODEL_PARALLEL)]
    launcher = subprocess.Popen(command, cwd=REPO, env=clean_environ(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rank_1 = child_with_rank(launcher.pid, 1)
        seen = wait_for_step(run, 4, launcher)
        # Rank 1 only: rank 0, which logs and writes the checkpoint's metadata, learns of it
        # from the step-boundary all-reduce.
        os.kill(rank_1, signal.SIGUSR1)
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # torchrun reports its children's exit codes: both ranks stopped as pre-empted.
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)) == {"75"}, stderr
    check_preempted(run, seen, PREEMPTED_EXIT_CODE, _without_torchrun_report(stderr), "SIGUSR1")
    _ok(torchrun(2, *train_arguments(run, *MODEL_PARALLEL)))
    assert_same_run(run, reference)


def _without_torchrun_report(stderr: str) -> str:
    """The ranks' own output: torchrun's ChildFailedError report (with its Traceback) cut."""
    return stderr.split("Traceback (most recent call last)")[0]


@pytest.mark.slow
def test_terabrain_launch_forwards_the_signal_and_exits_with_the_ranks_code(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "terabrain", "launch", "--nproc", "2",
         *train_arguments(run, *MODEL_PARALLEL)[2:]],
        cwd=REPO, env=clean_environ(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = wait_for_step(run, 3, launcher)
        launcher.send_signal(signal.SIGUSR1)  # as a scheduler signals the job's main process
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    check_preempted(run, seen, launcher.returncode, stderr, "SIGUSR1")

