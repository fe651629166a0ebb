"""`terabrain launch --nproc N train ...`: N ranks of one command on this machine.

torchrun would do, but when a rank fails it prints its own ChildFailedError traceback and
exits 1, whatever the ranks said. Here the ranks are started directly, with the variables an
env:// launch reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
and their outcome is passed on as it is: their own one-line messages on the shared stderr, and
their exit code (2 for a configuration error, 75 for a pre-emption, 1 for a failure). Only what
no rank can say itself (a rank killed by a signal) gets one line from here.

Signals a scheduler uses to pre-empt a job (SIGTERM, SIGUSR1, SIGUSR2, SIGHUP) are forwarded
to every rank; SIGINT from a terminal already reaches them all (one process group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

# After the first rank fails, the others normally fail fast by themselves (a closed
# connection); those still running after this long are stopped.
GRACE_S = 30.0
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def launch_local(nproc: int, arguments: Sequence[str], environ: dict[str, str]) -> int:
    """Run ``python ARGUMENTS`` as ranks 0..nproc-1 on this host; the ranks' exit code."""
    from torch.distributed import TCPStore

    # The rendezvous store lives here, as torchrun's does in its agent, not in rank 0: a rank
    # 0 that fails early (a configuration error) must not pull the store from under ranks
    # still joining, which would fail with a C++ stack dump instead of their own one line.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ranks = []
    for rank in range(nproc):
        rank_environ = {**environ, "RANK": str(rank), "WORLD_SIZE": str(nproc),
                        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}
        ranks.append(subprocess.Popen([sys.executable, *arguments], env=rank_environ))

    def forward(signum, frame) -> None:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {number: signal.signal(number, forward) for number in _FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return _wait(ranks)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _wait(ranks: list[subprocess.Popen]) -> int:
    """Wait for every rank. The code is that of the first rank to fail (0 if none did);
    after a failure, ranks that outlive the grace period are stopped."""
    first_failure: int | None = None
    failed_at = None
    while any(process.poll() is None for process in ranks):
        for rank, process in enumerate(ranks):
            code = process.poll()
            if code not in (None, 0) and first_failure is None:
                first_failure, failed_at = _exit_code(rank, code), time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
        time.sleep(0.05)
    if first_failure is None:
        for rank, process in enumerate(ranks):
            if process.returncode != 0:
                return _exit_code(rank, process.returncode)
    return first_failure or 0


def _exit_code(rank: int, code: int) -> int:
    """A rank's exit code as a shell reports it; a rank killed by a signal gets a line here,
    since it could not print one."""
    if code >= 0:
        return code
    name = signal.Signals(-code).name
    os.write(sys.stderr.fileno(), f"terabrain: rank {rank} was killed by {name}\n".encode())
    return 128 - code
