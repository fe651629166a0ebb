import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "parallel_scripts"

# Two-core CI machines: keep each test process from oversubscribing.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_cli(*args: str, timeout: float = 900, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m terabrain ARGS`` in a subprocess, as a user would run it."""
    result = subprocess.run(
        [sys.executable, "-m", "terabrain", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"terabrain {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def cli():
    return run_cli


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environ() -> dict[str, str]:
    """This environment without launcher variables: the test may itself run under srun."""
    prefixes = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL", "TORCHELASTIC_")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT"}
    environ = {k: v for k, v in os.environ.items()
               if k not in names and not k.startswith(prefixes)}
    return {**environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` (a script, or ``-m terabrain ...``)
    on CPU/gloo, one thread per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "--max-restarts", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=clean_environ())


@contextlib.contextmanager
def hang_fails(seconds: int):
    """A test that hangs (say, a FIFO opened for reading, which blocks until a writer comes)
    fails with TimeoutError after ``seconds`` instead of stalling the suite."""
    def timed_out(*_):
        raise TimeoutError("the test hung")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
