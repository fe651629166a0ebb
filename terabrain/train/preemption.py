"""Pre-emption: a signal (SLURM's warning before a time limit or a pre-emption, a scheduler's
SIGTERM) ends the run at a step boundary with a checkpoint (the next one; on several ranks the
one after), instead of losing the steps since the last one.

Two parts:
  - ``watch_signals(names)``: the signal handlers, installed once per process around the run.
    A handler only notes which signal came; nothing is done inside it (it may interrupt a
    collective, a write or the optimizer at any instruction).
  - ``PreemptionStop``: a callback that, after every step, asks all ranks with one small
    collective (a MAX all-reduce of one number) whether any of them has seen a signal. A
    scheduler may signal some ranks before others, or only one (``scancel --signal`` reaches
    every task, a hand-sent ``kill`` one process); since every rank takes part in the same
    all-reduce at the same step, they all agree on the step to stop at, write one checkpoint
    together and raise ``Preempted``. No rank checkpoints alone. The all-reduce started
    after one step is read after the next (no rank waits for the others at every step), so
    a multi-rank run stops one step later than a single process would.

The command line turns ``Preempted`` into one line and exit code ``PREEMPTED_EXIT_CODE`` (75,
EX_TEMPFAIL: "try again later"); running the same command again with ``--resume-if-exists``
(or ``--resume DIR``) continues from that checkpoint, identically to a run that never stopped.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from terabrain.errors import Preempted
from terabrain.hooks import Callback

# The signals a run may be asked to stop on (config field train.preempt_signals).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")

_received: str | None = None  # the first signal noted since watch_signals began


def pending() -> str | None:
    """The name of the signal this process received (None: none, or not watching)."""
    return _received


def _note(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum).name


@contextlib.contextmanager
def watch_signals(names: Sequence[str]) -> Iterator[None]:
    """Note the signals ``names`` (e.g. ["SIGTERM", "SIGUSR1"]) instead of dying of them,
    inside the block; the previous handlers come back after it. Main thread only (Python
    delivers signals there)."""
    global _received
    _received = None
    previous = {}
    try:
        for name in names:
            number = signal.Signals[name]
            previous[number] = signal.signal(number, _note)
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _received = None


class _SignalCheck:
    """The ranks' agreement on whether any of them has seen a signal: one MAX all-reduce of
    a flag over every rank, started after a step and read after the next. A blocking one
    cost every step of a 2-rank run here about 1.5 ms (a call waited for inside a step:
    Link.sync_s, docs/scaling.md); started one step ahead it has long finished when read."""

    def __init__(self, device: torch.device):
        index = PREEMPT_SIGNALS.index(_received) + 1 if _received in PREEMPT_SIGNALS else 0
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.flag = torch.tensor([index], dtype=torch.int32, device=on)
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)

    def agreed(self) -> str | None:
        self.work.wait()
        index = int(self.flag.item())
        return PREEMPT_SIGNALS[index - 1] if index else None


class PreemptionStop(Callback):
    """After each step, on every rank: if any rank has received a watched signal, make sure
    a checkpoint of this step exists (``checkpointing.ensure_saved``: the Checkpointing
    callback, which writes it on every rank unless it has just done so) and raise
    ``Preempted``. Comes after the Checkpointing callback in the list.

    With several ranks the answer runs one step behind: the check started after step N is
    read after step N + 1, so every rank stops at that same step, one step after the signal
    was noted, without waiting for the others at every step."""

    def __init__(self, checkpointing):
        self.checkpointing = checkpointing
        self._check: _SignalCheck | None = None

    def _agreed(self) -> str | None:
        """The signal the ranks agree on so far (None: none, or no answer yet)."""
        if not dist.is_initialized():
            return _received
        check, self._check = self._check, None
        return check.agreed() if check is not None else None

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        name = self._agreed()
        if name is None or trainer.stop_reason is not None:
            if dist.is_initialized():
                self._check = _SignalCheck(trainer.device)
            return  # a run that stops anyway (early stopping) finishes as it would have
        self.checkpointing.ensure_saved(trainer)
        raise Preempted(name, step)

    def on_train_end(self, trainer) -> None:
        # No collective left in flight: the last check is read (a signal that came during the
        # last step changes nothing: the run has finished and written its checkpoint).
        self._agreed()
