"""A linear probe: multinomial logistic regression on frozen features, trained with L-BFGS,
its L2 penalty chosen on a validation part of the training split, scored on a held-out split.

The same probe on learned features, on the pixels and on a random network tells whether
the learned features make the classes more linearly separable than their input does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1)


@dataclass
class LinearProbe:
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).float().mean())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float,
                 iterations: int = 100) -> LinearProbe:
    """Standardize features (train statistics), then minimise mean cross-entropy
    + weight_decay/2 ||W||^2 by full-batch L-BFGS from zero: a convex problem, so the
    result does not depend on a seed."""
    x = x.float()
    mean, scale = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / scale
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations,
                                  history_size=10, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-5, tolerance_change=1e-7)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean, scale, weight.detach(), bias.detach(), weight_decay)


def choose_weight_decay(x: torch.Tensor, y: torch.Tensor, classes: int,
                        weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                        validation_fraction: float = 0.2, seed: int = 0,
                        iterations: int = 100) -> tuple[float, dict[float, float]]:
    """The L2 penalty with the best accuracy on a seeded validation part of (x, y), fitted on
    the rest; and every penalty's validation accuracy. Only (x, y) is seen: pass the
    training split, never the test split."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(len(x) * validation_fraction))
    val, fit = order[:held], order[held:]
    scores = {wd: fit_logistic(x[fit], y[fit], classes, wd, iterations).accuracy(x[val], y[val])
              for wd in weight_decays}
    best = max(weight_decays, key=lambda wd: (scores[wd], -weight_decays.index(wd)))
    return best, scores


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int | None = None,
                weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                validation_fraction: float = 0.2, seed: int = 0) -> LinearProbe:
    """Choose the L2 penalty on a seeded validation part of (x, y), then refit on all of it."""
    classes = classes or int(y.max()) + 1
    best, _ = choose_weight_decay(x, y, classes, weight_decays, validation_fraction, seed)
    return fit_logistic(x, y, classes, best)
