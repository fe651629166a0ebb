"""The trainer's view of gradient communication: bytes on the wire in the metrics (and so in
``metrics.jsonl`` and TensorBoard), and the error-feedback residuals in checkpoints.

Metrics added on logged steps (this rank's figures; rank 0's are the ones written):
``comm_bytes_per_step``, the mean bytes this rank sent per step since the last logged step,
and ``comm_saving``, how many times fewer bytes than an fp32 all-reduce of the same tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from terabrain.hooks import Callback
from terabrain.parallel.exchange import GradientExchange
from terabrain.parallel.launch import is_main_rank
from terabrain.parallel.parallelism import Parallelism, local

if TYPE_CHECKING:  # annotations only: parallel does not import the training loop
    from terabrain.train.trainer import Trainer


class CommunicationLog(Callback):
    """Put it before the loggers: it adds its figures to the step's metrics."""

    def __init__(self, exchange: GradientExchange):
        # One per training stage (features, supervised): residuals never cross stages.
        exchange.reset()
        self.exchange = exchange
        self._sent = 0
        self._fp32 = 0
        self._steps = 0

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        sent, fp32 = self.exchange.take_bytes()
        self._sent += sent
        self._fp32 += fp32
        self._steps += 1
        if trainer.is_log_step(step):
            metrics["comm_bytes_per_step"] = self._sent / self._steps
            metrics["comm_saving"] = self._fp32 / self._sent if self._sent else 0.0
            self._sent = self._fp32 = self._steps = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.exchange.state_dict()

    def checkpoint_template(self, trainer: Trainer, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Called by ``restore`` with the checkpoint's entries of this callback."""
        shapes = [local(p).shape for p in trainer.model.parameters() if p.requires_grad]
        template = self.exchange.checkpoint_template(shapes, saved)
        if saved and not template and is_main_rank():
            print("[communication] the checkpoint's error-feedback residuals do not fit this "
                  "model's gradients (different model parallelism?); they start at zero")
        return template

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for note in self.exchange.load_state_dict(state):
            if is_main_rank():
                print(f"[communication] {note}")


def communication_callbacks(parallel: Parallelism, settings: Any) -> list[Callback]:
    """The callbacks a run's communication needs, to go first in the callback list."""
    from terabrain.parallel.localsgd import LocalSGD

    if parallel.exchange is not None:
        return [CommunicationLog(parallel.exchange)]
    if settings.mode == "localsgd" and parallel.data is not None:
        return [LocalSGD(parallel, settings.average_every)]
    return []


