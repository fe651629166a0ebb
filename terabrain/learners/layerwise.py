"""Layer-wise training of a deep network: greedy, and pipelined as in Ni et al. 2015, section 3.1.

Each Trainer step trains every *active* layer once on the same batch. An active layer's
input is what the layers below it produce through their *forward copies* — separate, frozen
instances of those layers, refreshed from the weights being trained (Ni et al. 2015 runs "two
instances of layer L: one which continues training and one that uses up-to-date parameters
to forward propagate data ... periodically synchronized"). Inputs are detached, so the
gradient of the summed losses is each layer's own gradient: with a per-parameter optimizer
(SGD, Adam, ...) this is independent training of each layer, interleaved step by step.

- greedy: layer L+1 starts when layer L has finished: its budget (``layers[L].steps`` or
  ``train.steps``) is spent, or its loss has not improved by ``early_stopping.min_delta``
  for ``early_stopping.patience`` logged steps. A finished layer no longer changes, so it
  is its own forward copy: greedy training keeps no copies. The optimizer's state is
  cleared when a layer starts (L-BFGS's curvature history belongs to the layer before).
- pipelined: layer L+1 starts once layer L has trained ``model.start_after`` steps; layer
  L keeps training, and its forward copy is refreshed every ``model.sync_every`` of its steps
  and when it finishes. Copies are kept of the layers below the top one (the top layer
  feeds none), in ``model.forward_copies`` (fp32 or bf16).

Residency: only the active layers hold gradients (the trainer sets gradients to None each
step, and inactive layers get none) and optimizer state (a layer's state is dropped when
it finishes); only active layers are renormalised after a step.

Everything the schedule decides is in its checkpointed state and the forward copies are
part of the model's state, so a resumed run continues exactly.

On a network split by rows across the model axis (terabrain.parallel.spatial_network),
``SpatialLayerwiseObjective`` sums each rank's part of the losses over that axis.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from terabrain.hooks import Callback, Plateau
from terabrain.nn.deep import DeepNetwork
from terabrain.objectives import Objective, rica_loss
from terabrain.parallel.parallelism import local
from terabrain.parallel.spatial_network import model_axis, sum_of_parts

if TYPE_CHECKING:  # annotations only: learners do not import the training loop
    from terabrain.train.trainer import Trainer


class LayerwiseModel(nn.Module):
    """The network being trained and the frozen forward copies of its layers below the top
    one (``copies``; none for greedy training), stored in ``copy_dtype``."""

    def __init__(self, network: DeepNetwork, copies: bool = True,
                 copy_dtype: torch.dtype | None = None):
        super().__init__()
        self.network = network
        self.forward_copies = nn.ModuleList()
        if copies:
            self.forward_copies = copy.deepcopy(network.layers[:-1])
            if copy_dtype is not None:
                self.forward_copies.to(copy_dtype)
            for parameter in self.forward_copies.parameters():
                parameter.requires_grad_(False)

    def forward_layer(self, index: int) -> nn.Module:
        """What feeds the layers above layer ``index``: its forward copy, or (greedy) the
        finished layer itself."""
        if index < len(self.forward_copies):
            return self.forward_copies[index]
        return self.network.layers[index]

    def encode_below(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s codes of ``h`` through its forward layer, in ``h``'s dtype (a
        bf16 copy computes in bf16)."""
        layer = self.forward_layer(index)
        dtype = next(layer.parameters()).dtype
        return layer.encode(h.to(dtype)).to(h.dtype)

    @torch.no_grad()
    def sync_(self, index: int) -> None:
        """Layer ``index``'s forward copy takes the trained weights."""
        if index >= len(self.forward_copies):
            return
        source = dict(self.network.layers[index].named_parameters())
        for name, parameter in self.forward_copies[index].named_parameters():
            parameter.copy_(source[name])


class LayerSchedule(Callback):
    """Which layers train at each step; starts, finishes and refreshes them."""

    def __init__(
        self,
        model: LayerwiseModel,
        budgets: Sequence[int],
        schedule: str,
        start_after: int,
        sync_every: int,
        patience: int = 0,
        min_delta: float = 0.0,
    ):
        if schedule not in ("greedy", "pipelined"):
            raise ValueError(f"model.schedule {schedule!r}; allowed: greedy, pipelined")
        self.model = model
        self.budgets = list(budgets)
        self.schedule = schedule
        self.start_after = start_after
        self.sync_every = sync_every
        count = len(self.budgets)
        self.started_at = [-1] * count  # the trainer step at which each layer started
        self.trained = [0] * count
        self.finished = [False] * count
        self.plateaus = [Plateau(patience, min_delta) for _ in range(count)]
        self.stop_reasons = [""] * count
        self.started_at[0] = 0

    @property
    def total_budget(self) -> int:
        return sum(self.budgets)

    def active(self) -> list[int]:
        return [k for k, at in enumerate(self.started_at) if at >= 0 and not self.finished[k]]

    def _finish(self, trainer: Trainer, index: int, reason: str) -> None:
        self.finished[index] = True
        self.stop_reasons[index] = reason
        self.model.sync_(index)
        for parameter in self.model.network.layers[index].parameters():  # it trains no more
            trainer.optimizer.state.pop(parameter, None)

    def _start(self, trainer: Trainer, index: int, step: int) -> None:
        self.started_at[index] = step
        self.model.sync_(index - 1)
        if self.schedule == "greedy":
            trainer.optimizer.state.clear()

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        for k in self.active():
            self.trained[k] += 1
            loss = metrics.get(f"layer{k + 1}/loss")
            if loss is not None and self.plateaus[k].update(loss):
                self._finish(trainer, k, f"no improvement for {self.plateaus[k].waited} logged steps")
            elif self.trained[k] >= self.budgets[k]:
                self._finish(trainer, k, "budget")
            elif self.schedule == "pipelined" and self.trained[k] % self.sync_every == 0:
                self.model.sync_(k)
        for k in range(1, len(self.budgets)):
            if self.started_at[k] >= 0:
                continue
            below_ready = self.finished[k - 1] or (
                self.schedule == "pipelined" and self.trained[k - 1] >= self.start_after
            )
            if below_ready and self.started_at[k - 1] >= 0:
                self._start(trainer, k, step)
        if all(self.finished):
            trainer.request_stop("every layer has finished")

    def summary(self) -> list[dict]:
        return [
            {"layer": k + 1, "started_at_step": self.started_at[k], "steps": self.trained[k],
             "stopped": self.stop_reasons[k] or "not finished"}
            for k in range(len(self.budgets))
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        best, waited = zip(*(plateau.state() for plateau in self.plateaus))
        return {
            "started_at": torch.tensor(self.started_at),
            "trained": torch.tensor(self.trained),
            "finished": torch.tensor(self.finished),
            "best": torch.stack(best),
            "waited": torch.stack(waited),
            # Why each layer stopped, as codes: checkpoints hold tensors only.
            "stopped_by_plateau": torch.tensor([r.startswith("no improvement") for r in self.stop_reasons]),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.started_at = [int(v) for v in state["started_at"]]
        self.trained = [int(v) for v in state["trained"]]
        self.finished = [bool(v) for v in state["finished"]]
        for plateau, best, waited in zip(self.plateaus, state["best"], state["waited"]):
            plateau.load(best, waited)
        self.stop_reasons = [
            ("no improvement (before restart)" if plateau else "budget") if done else ""
            for done, plateau in zip(self.finished, state["stopped_by_plateau"].tolist())
        ]


class LayerwiseObjective(Objective):
    """The sum of the active layers' RICA losses, each on the forward copies' output of the
    layers below. Logs ``layerN/loss``, ``layerN/reconstruction``, ``layerN/sparsity``."""

    def __init__(self, schedule: LayerSchedule, sparsity_weights: Sequence[float], epsilon: float):
        self.schedule = schedule
        self.sparsity_weights = list(sparsity_weights)
        self.epsilon = epsilon

    def __call__(self, model: LayerwiseModel, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        active = self.schedule.active()
        network = model.network
        h = network.to_images(x)
        total = torch.zeros((), device=x.device)
        parts: dict[str, torch.Tensor] = {}
        top = max(active)
        for k in range(top + 1):
            if k in active:
                codes, reconstruction = network.layers[k](h)
                loss, named = rica_loss(codes, reconstruction, h, self.sparsity_weights[k], self.epsilon)
                total = total + loss
                parts[f"layer{k + 1}/loss"] = loss.detach()
                parts.update({f"layer{k + 1}/{name}": value.detach() for name, value in named.items()})
            if k < top:
                with torch.no_grad():
                    h = network.post[k](model.encode_below(k, h))
        return total, parts

    def after_step(self, model: LayerwiseModel) -> None:
        for k in self.schedule.active():  # the others have not changed
            model.network.layers[k].normalize_()


class SpatialLayerwiseObjective(LayerwiseObjective):
    """Layer-wise RICA on a split network: each rank's loss over its rows and units, summed
    over the model axis (so are the logged parts)."""

    def __call__(self, model, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        network = model.network
        axis = model_axis(network)
        images = network.to_images(local(x))
        start, stop = network.layers[0].owned_rows
        total, parts = super().__call__(model, images[:, :, start:stop], y)
        names = list(parts)
        flat = torch.stack([parts[n].float() for n in names]) if names else total.new_zeros(0)
        total, flat = sum_of_parts(total, flat, axis)
        return total, {n: flat[i] for i, n in enumerate(names)}
