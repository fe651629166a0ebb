"""Local SGD: every replica steps on its own share of the batch with its own optimizer, and
every K steps (``parallel.average_every``) the replicas' parameters are replaced by their
mean, in one all-reduce. Communication falls K-fold against synchronous data parallelism;
between averages the replicas drift apart, which costs accuracy as K or the learning rate
grows.

Optimizer state (momentum, Adam's moments) stays per replica and is never averaged. The
objective's constraint (RICA's unit-norm rows) is applied again after each average, since a
mean of unit rows is not a unit row. An average is also taken at the end of training, so the
final weights and the final checkpoint are the mean model. Checkpoints in between hold
replica 0's parameters and optimizer state (the replicas' copies differ there): set
``train.checkpoint_every`` to a multiple of K to checkpoint only averaged models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from terabrain.hooks import Callback
from terabrain.parallel.exchange import all_reduce_bytes
from terabrain.parallel.parallelism import Parallelism, local

if TYPE_CHECKING:  # annotations only: parallel does not import the training loop
    from terabrain.train.trainer import Trainer


class LocalSGD(Callback):
    def __init__(self, parallel: Parallelism, every: int):
        if parallel.data is None:
            raise ValueError("local SGD needs data-parallel replicas")
        self.parallel = parallel
        self.every = every
        self.averages = 0
        self._sent = 0
        self._steps = 0

    @torch.no_grad()
    def average(self, trainer: Trainer) -> None:
        parameters = [local(p) for p in trainer.model.parameters()]
        flat = torch.cat([p.reshape(-1).float() for p in parameters])
        dist.all_reduce(flat, group=self.parallel.data.group)
        flat /= self.parallel.data.size
        offset = 0
        for parameter in parameters:
            parameter.copy_(flat[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()
        trainer.objective.after_step(trainer.model)
        self.averages += 1
        self._sent += all_reduce_bytes(flat.numel(), 4, self.parallel.data.size)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0:
            self.average(trainer)
        self._steps += 1
        self._sent += self.parallel.value_bytes
        self.parallel.value_bytes = 0
        if trainer.is_log_step(step):
            metrics["comm_bytes_per_step"] = self._sent / self._steps
            self._sent = self._steps = 0

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.step % self.every:
            self.average(trainer)
