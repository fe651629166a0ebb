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
    iterations: int = 0
    """L-BFGS iterations the fit took (at most its limit)."""
    gradient: float = float("nan")
    """The largest absolute gradient entry at the end: how far from the optimum it stopped."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).float().mean())


PRECISIONS = ("fp32", "bf16")
_CHUNK_ROWS = 4096


def standardize(x: torch.Tensor, precision: str = "fp32"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean) / std with x's own statistics, as float32; in place when converting to
    float32 already made a copy (float16 features: one float32 copy, not two).

    ``precision="bf16"``: the standardised features as bfloat16, made a block of rows at a
    time (no float32 copy of the whole matrix), the statistics accumulated in float64."""
    if precision == "fp32":
        z = x.float()
        mean, scale = z.mean(dim=0), z.std(dim=0).clamp_min(1e-6)
        z = z.sub_(mean).div_(scale) if z is not x else (z - mean) / scale
        return z, mean, scale
    if precision != "bf16":
        raise ValueError(f"probe precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    n = len(x)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, n, _CHUNK_ROWS):
        block = x[start:start + _CHUNK_ROWS].double()
        total += block.sum(dim=0)
        squares += block.pow_(2).sum(dim=0)
    mean64 = total / n
    variance = (squares - n * mean64 ** 2) / max(n - 1, 1)
    mean, scale = mean64.float(), variance.clamp_min(0).sqrt().float().clamp_min(1e-6)
    z = torch.empty(x.shape, dtype=torch.bfloat16)
    for start in range(0, n, _CHUNK_ROWS):
        z[start:start + _CHUNK_ROWS] = (x[start:start + _CHUNK_ROWS].float() - mean) / scale
    return z, mean, scale


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float,
                 iterations: int = 100, start: LinearProbe | None = None,
                 precision: str = "fp32",
                 standardized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 ) -> LinearProbe:
    """Standardize features (train statistics), then minimise mean cross-entropy
    + weight_decay/2 ||W||^2 by full-batch L-BFGS: a convex problem, so the result does not
    depend on a seed. From zero, or from ``start``'s weights (a warm start: the solution for a
    nearby penalty or a subset of the rows, which needs fewer iterations to the same optimum).

    ``precision="bf16"`` keeps the standardised features in bfloat16 and runs the two
    products per evaluation (logits, weight gradient) in bfloat16 with float32 accumulation;
    the weights, the loss and the L-BFGS state stay float32. The products read the whole
    feature matrix and are memory-bound: 0.25 against 0.72 s per evaluation on 48,000 x 6,400
    features (docs/analysis.md). ``standardized``: (z, mean, scale) of x made already."""
    z, mean, scale = standardized if standardized is not None else standardize(x, precision)
    weight = torch.zeros(classes, x.shape[1])
    bias = torch.zeros(classes)
    if start is not None:
        weight.copy_(start.weight)
        bias.copy_(start.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations,
                                  history_size=10, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-5, tolerance_change=1e-7)

    def closure():
        optimizer.zero_grad()
        logits = (z @ weight.T.to(z.dtype)).float() + bias
        loss = F.cross_entropy(logits, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()
    state = optimizer.state[weight]  # L-BFGS keeps its counters with the first parameter
    gradient = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    return LinearProbe(mean, scale, weight.detach(), bias.detach(), weight_decay,
                       int(state.get("n_iter", 0)), gradient)


def choose_weight_decay(x: torch.Tensor, y: torch.Tensor, classes: int,
                        weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                        validation_fraction: float = 0.2, seed: int = 0,
                        iterations: int = 100, warm_start: bool = False,
                        ) -> tuple[float, dict[float, float]]:
    """The L2 penalty with the best accuracy on a seeded validation part of (x, y), fitted on
    the rest; and every penalty's validation accuracy. Only (x, y) is seen: pass the
    training split, never the test split. With ``warm_start`` the penalties are fitted from
    the largest down, each starting from the previous solution (a regularisation path)."""
    best, scores, _ = choose_weight_decay_path(x, y, classes, weight_decays, validation_fraction,
                                               seed, iterations, warm_start)
    return best, scores


def choose_weight_decay_path(x: torch.Tensor, y: torch.Tensor, classes: int,
                             weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                             validation_fraction: float = 0.2, seed: int = 0,
                             iterations: int = 100, warm_start: bool = False,
                             precision: str = "fp32",
                             ) -> tuple[float, dict[float, float], LinearProbe]:
    """choose_weight_decay, also returning the chosen penalty's probe (fitted on the part
    of (x, y) outside the validation rows): a warm start for the refit on all of (x, y)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(len(x) * validation_fraction))
    val, fit = order[:held], order[held:]
    x_fit, y_fit = x[fit], y[fit]
    x_val, y_val = x[val], y[val]
    probes: dict[float, LinearProbe] = {}
    previous = None
    standardized = standardize(x_fit, precision)  # once for every penalty
    for wd in sorted(weight_decays, reverse=True) if warm_start else weight_decays:
        probes[wd] = fit_logistic(x_fit, y_fit, classes, wd, iterations,
                                  start=previous if warm_start else None,
                                  standardized=standardized)
        previous = probes[wd]
    scores = {wd: probes[wd].accuracy(x_val, y_val) for wd in weight_decays}
    best = max(weight_decays, key=lambda wd: (scores[wd], -weight_decays.index(wd)))
    return best, scores, probes[best]


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int | None = None,
                weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                validation_fraction: float = 0.2, seed: int = 0) -> LinearProbe:
    """Choose the L2 penalty on a seeded validation part of (x, y), then refit on all of it."""
    classes = classes or int(y.max()) + 1
    best, _ = choose_weight_decay(x, y, classes, weight_decays, validation_fraction, seed)
    return fit_logistic(x, y, classes, best)
