"""The interface between the training loop and what plugs into it: ``Callback`` (the hooks
the Trainer calls) and ``Plateau`` (the no-improvement counter that stopping rules share).

Neutral ground: the loop (terabrain.train), the parallel plans' callbacks
(terabrain.parallel: communication, local SGD) and the learners' schedules
(terabrain.learners) all import it, and it imports none of them at run time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from terabrain.train.trainer import Trainer


class Callback:
    """Hooks into the loop. ``state_dict`` returns tensors to checkpoint, if any."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class Plateau:
    """Counts logged losses that failed to improve on the best by ``min_delta`` (relative)."""

    def __init__(self, patience: int, min_delta: float):
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.waited = 0

    def update(self, loss: float) -> bool:
        """Records ``loss``; True once ``patience`` losses in a row brought no progress."""
        if loss < self.best - self.min_delta * abs(self.best if math.isfinite(self.best) else 0):
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        return bool(self.patience) and self.waited >= self.patience

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.best, dtype=torch.float64), torch.tensor(self.waited)

    def load(self, best: torch.Tensor, waited: torch.Tensor) -> None:
        self.best, self.waited = float(best), int(waited)
