"""Training objectives. Each returns the loss to minimise and its named parts for logging.

All are averaged over the examples of a batch (summed over input dimensions), so a learning
rate does not depend on the batch size and a data-parallel mean of per-replica losses equals
the loss of the global batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from terabrain.nn.autoencoder import RICA, Autoencoder

Parts = dict[str, torch.Tensor]


class Objective:
    """``loss, parts = objective(model, x, y)``; ``after_step`` keeps constraints."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Parts]:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step, outside autograd."""


def _squared_error(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (reconstruction.float() - x.float()).pow(2).sum(dim=1).mean()


def rica_loss(
    codes: torch.Tensor, reconstruction: torch.Tensor, x: torch.Tensor,
    sparsity_weight: float, epsilon: float,
) -> tuple[torch.Tensor, Parts]:
    """Ni et al. 2015, eq. 1, per example and averaged over the batch; any shapes (images too):
    everything but the batch dimension is summed."""
    error = _squared_error(reconstruction.flatten(1), x.flatten(1))
    sparsity = torch.sqrt(codes.float().flatten(1).pow(2) + epsilon).sum(dim=1).mean()
    loss = error + sparsity_weight * sparsity
    return loss, {"reconstruction": error, "sparsity": sparsity}


class RICAObjective(Objective):
    """Ni et al. 2015, eq. 1: ``||W^T(alpha W x) + b - x||^2 + lambda sum_j sqrt((alpha W x)_j^2
    + eps)`` subject to unit-norm rows of W. The square root is the smooth L1 penalty of
    Le et al. (2011); ``eps`` makes it differentiable at zero."""

    logged_names = ("loss", "reconstruction", "sparsity")  # the loss and its parts, as the trainer logs them

    def __init__(self, sparsity_weight: float, epsilon: float):
        self.sparsity_weight = sparsity_weight
        self.epsilon = epsilon

    def __call__(self, model: RICA, x, y=None):
        codes, reconstruction = model(x)
        return rica_loss(codes, reconstruction, x, self.sparsity_weight, self.epsilon)

    def after_step(self, model: RICA) -> None:
        model.normalize_()


def _weight_decay(model: Autoencoder, weight: float) -> torch.Tensor:
    if weight == 0.0:
        # Not computed at all: even multiplied by 0 it would cost a weight-sized gradient.
        return torch.zeros((), device=model.encoder.weight.device)
    return 0.5 * weight * sum(w.pow(2).sum() for w in model.weights())


class ReconstructionObjective(Objective):
    """Squared reconstruction error (plus optional weight decay)."""

    logged_names = ("loss", "reconstruction", "weight_decay")  # the loss and its parts, as the trainer logs them

    def __init__(self, weight_decay: float = 0.0):
        self.weight_decay = weight_decay

    def __call__(self, model: Autoencoder, x, y=None):
        _, reconstruction = model(x)
        error = _squared_error(reconstruction, x)
        decay = _weight_decay(model, self.weight_decay)
        return error + decay, {"reconstruction": error, "weight_decay": decay}


class SparseAutoencoderObjective(Objective):
    """``0.5 ||x' - x||^2 + beta sum_j KL(rho || rho_hat_j) + (wd/2) ||W||^2`` with
    ``rho_hat`` the mean activation of each hidden unit over the batch (UFLDL's form)."""

    logged_names = ("loss", "reconstruction", "kl", "weight_decay")  # the loss and its parts, as the trainer logs them

    def __init__(self, rho: float, beta: float, weight_decay: float):
        self.rho = rho
        self.beta = beta
        self.weight_decay = weight_decay

    def __call__(self, model: Autoencoder, x, y=None):
        codes, reconstruction = model(x)
        error = 0.5 * _squared_error(reconstruction, x)
        rho_hat = codes.float().mean(dim=0).clamp(1e-6, 1 - 1e-6)
        rho = self.rho
        kl = (
            rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        ).sum()
        decay = _weight_decay(model, self.weight_decay)
        loss = error + self.beta * kl + decay
        return loss, {"reconstruction": error, "kl": kl, "weight_decay": decay}


class ClassificationObjective(Objective):
    """Cross-entropy on integer labels; also reports the batch accuracy."""

    def __call__(self, model, x, y=None):
        logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return loss, {"accuracy": accuracy}


class RegressionObjective(Objective):
    """Mean squared error on real-valued targets (one or more per example)."""

    def __call__(self, model, x, y=None):
        prediction = model(x).float()
        target = y.float().reshape(prediction.shape)
        loss = F.mse_loss(prediction, target)
        return loss, {"mse": loss.detach()}


_OBJECTIVES = {
    "rica": lambda c: RICAObjective(c.sparsity_weight, c.sparsity_epsilon),
    "sparse_autoencoder": lambda c: SparseAutoencoderObjective(c.rho, c.beta, c.weight_decay),
    "reconstruction": lambda c: ReconstructionObjective(c.weight_decay),
}


def build_objective(config) -> Objective:
    """The objective of an ``objective`` section (terabrain.config.sections)."""
    return _OBJECTIVES[config.kind](config)


def build_supervised_objective(task: str) -> Objective:
    return ClassificationObjective() if task == "classification" else RegressionObjective()
