import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Two-core CI machines: keep each test process from oversubscribing.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_cli(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
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
