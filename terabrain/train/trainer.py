"""The training loop: batches, closure, optimizer step, constraint, callbacks. Nothing else.

Everything a run needs to continue exactly after a restart is in ``state_dict()``: the
model, the optimizer, the step, the RNG state (dropout), each callback's own state and, for
a streamed collection, the batch source's counters. The order of batches is a pure function
of (seed, step), so the step is the data position: a resumed run continues mid-epoch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import nn

from terabrain.data.eight_bit import unit_float  # 8-bit pixels become float32 per batch
from terabrain.errors import ConfigError
from terabrain.hooks import Callback  # the loop's hooks, defined where plans can import them
from terabrain.objectives import Objective
from terabrain.parallel.parallelism import Parallelism, full
from terabrain.train.optim import load_optimizer_state_tensors, optimizer_state_tensors


class BatchOrder:
    """Which rows form the batch of each step: a fresh permutation every epoch, seeded by
    (seed, epoch), incomplete last batch dropped. ``batch_size=None`` means all rows."""

    def __init__(self, rows: int, batch_size: Optional[int], seed: int):
        self.rows = rows
        self.batch_size = min(batch_size or rows, rows)
        self.per_epoch = rows // self.batch_size
        self.seed = seed
        self._epoch = -1
        self._permutation: Optional[torch.Tensor] = None

    def epoch(self, step: int) -> int:
        return step // self.per_epoch

    def indices(self, step: int) -> Optional[torch.Tensor]:
        """Row indices for ``step``; None when the batch is the whole data set in order."""
        if self.batch_size == self.rows:
            return None
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.rows, generator=generator)
            self._epoch = epoch
        start = position * self.batch_size
        return self._permutation[start : start + self.batch_size]


class BatchSource(Protocol):
    """Where batches come from when the data set is not one in-memory tensor (a streamed
    collection: terabrain.data.batch_stream.BatchStream). ``batch(step)`` returns this rank's
    share of the global batch of ``step``, a pure function of (seed, step, rank);
    ``metrics()`` is called on every rank at logged steps (it may be a collective)."""

    batch_size: int

    def batch(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


@dataclass
class StepTimes:
    data_s: float = 0.0
    compute_s: float = 0.0


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        inputs: Optional[torch.Tensor],
        targets: Optional[torch.Tensor],
        *,
        steps: int,
        batch_size: Optional[int],
        seed: int,
        device: torch.device,
        precision: str = "fp32",
        optimizer_in_backward: bool = False,
        log_every: int = 1,
        callbacks: Sequence[Callback] = (),
        parallel: Optional[Parallelism] = None,
        batches: Optional[BatchSource] = None,
    ):
        self.model = model.to(device)
        self.objective = objective
        self.optimizer = optimizer
        self.device = device
        self.batches = batches
        if batches is None:
            self.inputs = inputs.to(device)
            self.targets = targets.to(device) if targets is not None else None
            self.order = BatchOrder(len(inputs), batch_size, seed)
        self.steps = steps
        self.log_every = log_every
        self.callbacks = list(callbacks)
        self.parallel = parallel or Parallelism(None)
        self.parallel.watch(self.model)
        self.step = 0
        self.stop_reason: Optional[str] = None
        self.times = StepTimes()
        self._autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision in ("bf16", "bf16-weights")
            else nullcontext()
        )
        self.optimizer_in_backward = optimizer_in_backward
        if optimizer_in_backward:
            self._step_in_backward()

    def _step_in_backward(self) -> None:
        """Each parameter is updated as soon as its gradient is complete, and its gradient
        freed, so no gradient outlives its layer's backward pass. The one optimizer (and so
        its checkpointed state) serves every parameter: when a parameter's hook runs, it is
        the only one holding a gradient, and torch.optim skips parameters without one."""
        if isinstance(self.optimizer, torch.optim.LBFGS):
            raise ConfigError("train.optimizer_in_backward: L-BFGS needs every gradient before "
                              "it steps; allowed with optimizer.name sgd, adagrad, rmsprop, "
                              "adam, adamw")
        if self.parallel.data is not None:
            raise ConfigError("train.optimizer_in_backward: with parallel.data > 1 the gradients "
                              "are averaged across replicas after the backward pass; set "
                              "parallel.data=1 or train.optimizer_in_backward=false")

        def step(parameter: torch.Tensor) -> None:
            self.optimizer.step()
            parameter.grad = None

        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                parameter.register_post_accumulate_grad_hook(step)

    @property
    def batch_size(self) -> int:
        return self.batches.batch_size if self.batches is not None else self.order.batch_size

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def batch(self, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This rank's inputs and targets for ``step``, as the model expects them."""
        if self.batches is not None:
            x, y = self.batches.batch(step)
            return self.parallel.inputs(x), self.parallel.inputs(y)
        rows = self.order.indices(step)
        if self.parallel.data is not None:
            rows = self.parallel.rows(torch.arange(self.order.rows) if rows is None else rows)
        if rows is None:
            x, y = unit_float(self.inputs), self.targets
        else:
            rows = rows.to(self.device)
            x, y = unit_float(self.inputs[rows]), (self.targets[rows] if self.targets is not None else None)
        return self.parallel.inputs(x), self.parallel.inputs(y)

    def train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step. A closure serves every optimizer alike: L-BFGS calls it
        several times per step, the others once."""
        parts: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast:
                loss, named = self.objective(self.model, x, y)
            loss.backward()
            parts.clear()
            parts.update({name: value.detach().clone() for name, value in named.items()})
            parts["loss"] = loss.detach().clone()
            if self.parallel.data is not None:
                gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
                self.parallel.synchronize(gradients, list(parts.values()))
                return parts["loss"]
            return loss

        self.model.train()
        if self.optimizer_in_backward:
            closure()  # every update happened inside backward()
        else:
            self.optimizer.step(closure)
        with torch.no_grad():
            self.objective.after_step(self.model)
        return parts

    def fit(self) -> None:
        for callback in self.callbacks:
            callback.on_train_start(self)
        try:
            self._loop()
        finally:
            if self.batches is not None:
                self.batches.close()  # stops prefetching; a later batch() starts it again
        for callback in self.callbacks:
            callback.on_train_end(self)

    def _loop(self) -> None:
        while self.step < self.steps and self.stop_reason is None:
            begin = time.perf_counter()
            x, y = self.batch(self.step)
            fetched = time.perf_counter()
            parts = self.train_step(x, y)
            self.step += 1
            # The loss is read every step (the NaN guard needs it); the other parts only on
            # logged steps, since each read waits for the device.
            metrics = {"step": self.step, "loss": float(full(parts["loss"]))}
            if self.is_log_step(self.step):
                metrics.update({name: float(full(value)) for name, value in parts.items()})
                if self.batches is not None:
                    metrics.update(self.batches.metrics())
            done = time.perf_counter()
            self.times = StepTimes(fetched - begin, done - fetched)
            for callback in self.callbacks:
                callback.on_step_end(self, self.step, metrics)

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    # --- checkpointed state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": optimizer_state_tensors(self.model, self.optimizer),
            "trainer": {"step": torch.tensor(self.step), "rng": torch.get_rng_state()},
            "callbacks": {},
        }
        if self.batches is not None:
            state["data"] = self.batches.state_dict()
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["trainer"]["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        for callback in self.callbacks:
            own = callback.state_dict()
            if own:
                state["callbacks"][type(callback).__name__] = own
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state_tensors(self.model, self.optimizer, state["optimizer"])
        self.step = int(state["trainer"]["step"])
        torch.set_rng_state(state["trainer"]["rng"])
        if "cuda_rng" in state["trainer"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["trainer"]["cuda_rng"], self.device)
        if self.batches is not None and "data" in state:
            self.batches.load_state_dict(state["data"])
        for callback in self.callbacks:
            own = state["callbacks"].get(type(callback).__name__)
            if own:
                callback.load_state_dict(own)
