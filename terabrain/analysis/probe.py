"""A linear probe: multinomial logistic regression on frozen features, trained with L-BFGS,
its L2 penalty chosen on a validation part of the training split, scored on a held-out split.

The same probe on learned features, on the pixels and on a random network tells whether
the learned features make the classes more linearly separable than their input does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from terabrain.analysis.lockstep import run_in_lockstep

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
_CHUNK_ROWS = 1024


def standardize(x: torch.Tensor, precision: str = "fp32"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean) / std with x's own statistics, as float32 (or as bfloat16 with
    ``precision="bf16"``), made a block of rows at a time: one pass for the statistics
    (accumulated in float64), one that writes each output block while its input block is in
    cache; no whole-matrix temporaries (float16 features: one output copy)."""
    if precision not in PRECISIONS:
        raise ValueError(f"probe precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    n = len(x)
    # Sums of x - shift (the first block's mean): the variance as E[d^2] - E[d]^2 then has
    # no cancellation where a feature's mean is large against its spread.
    shift = x[:_CHUNK_ROWS].float().mean(dim=0)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, n, _CHUNK_ROWS):
        block = x[start:start + _CHUNK_ROWS].float() - shift  # never a view of x
        total += block.sum(dim=0)  # a block's sums in float32, the running ones in float64
        squares += block.pow_(2).sum(dim=0)
    offset = total / n
    variance = (squares - n * offset ** 2) / max(n - 1, 1)
    mean = (shift.double() + offset).float()
    scale = variance.clamp_min(0).sqrt().float().clamp_min(1e-6)
    z = torch.empty(x.shape, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    for start in range(0, n, _CHUNK_ROWS):
        z[start:start + _CHUNK_ROWS] = (x[start:start + _CHUNK_ROWS].float() - mean) / scale
    return z, mean, scale


LBFGS_HISTORY = 10
"""Curvature pairs L-BFGS keeps (30 fitted no better at K = 1,600)."""
CORRELATION_ROWS = 8192
"""Rows of the standardised features whose correlation preconditions the fit (spread over
the whole matrix): about 4 s of products at 6,400 features on 2 cores; 16,384 rows took
twice that and saved less than it cost in iterations."""
PRECONDITIONED_FEATURES = 16384
"""Above this many features the fit is not preconditioned (the factor is features^2 floats:
1 GiB here)."""
CORRELATION_FLOOR = 1e-3
SOFTMAX_CURVATURE = 0.1
"""The softmax's curvature per row, p (1 - p), roughly, once a fit is under way: the data
term's Hessian is about this times the features' correlation, the penalty's is
weight_decay x I, so the factor of correlation + weight_decay / SOFTMAX_CURVATURE x I matches
both."""


class Preconditioner:
    """The change of variables W = U L^-1 with L L^T = C + r I (C the standardised features'
    correlation): in U the data term's Hessian is about the identity, so L-BFGS needs tens of
    iterations where it needed hundreds (pooled codes of neighbouring filters are strongly
    correlated; standardising each feature leaves that). Any invertible L has the same
    optimum: only the path to it changes. ``factor`` None: no change (W = U)."""

    def __init__(self, factor: torch.Tensor | None):
        self.factor = factor

    def weight(self, coordinates: torch.Tensor) -> torch.Tensor:
        if self.factor is None:
            return coordinates
        return torch.linalg.solve_triangular(self.factor.T, coordinates.T, upper=True).T

    def coordinates(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.factor is None else weight @ self.factor

    def gradient(self, weight_gradient: torch.Tensor) -> torch.Tensor:
        """d/dU of a function of W, from its d/dW: dW L^-T."""
        if self.factor is None:
            return weight_gradient
        return torch.linalg.solve_triangular(self.factor, weight_gradient.T, upper=False).T


@dataclass
class FeatureCorrelation:
    """The standardised features' correlation on CORRELATION_ROWS of their rows, made once
    and shared by every penalty's fit and by the refit (a preconditioner need not be exact).
    ``matrix`` None: too many features to precondition."""
    matrix: torch.Tensor | None

    @classmethod
    def of(cls, z: torch.Tensor) -> "FeatureCorrelation":
        if z.shape[1] > PRECONDITIONED_FEATURES:
            return cls(None)
        step = max(1, len(z) // CORRELATION_ROWS)
        rows = z[::step][:CORRELATION_ROWS].float()
        return cls(rows.T @ rows / max(len(rows), 1))

    def preconditioner(self, weight_decay: float) -> Preconditioner:
        """The Cholesky factor of C + (CORRELATION_FLOOR + weight_decay / SOFTMAX_CURVATURE) I;
        the ridge grows tenfold where rounding leaves the matrix not positive definite."""
        if self.matrix is None:
            return Preconditioner(None)
        ridge = CORRELATION_FLOOR + weight_decay / SOFTMAX_CURVATURE
        for _ in range(4):
            shifted = self.matrix.clone()
            shifted.diagonal().add_(ridge)
            factor, info = torch.linalg.cholesky_ex(shifted)
            if int(info) == 0:
                return Preconditioner(factor)
            ridge *= 10
        return Preconditioner(None)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 through numpy's BLAS (OpenBLAS): for the probe's thin products
    (features x tens of columns) it ran 1.5-2x faster than torch's MKL on the AMD EPYC CPUs
    here (60,000 x 6,400 features, 40 columns: gradient 0.21 against 0.31-0.39 s, logits 0.30
    against 0.35 s; 10 columns: 0.14 against 0.25 s and 0.20 against 0.17 s)."""
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


class _LogisticObjective:
    """Mean cross-entropy + weight_decay/2 ||W||^2 and its gradient for several penalties at
    once, in their preconditioned coordinates: the two products that read the features
    (logits, weight gradient) are made for every asking fit together, (n, d) x (d, fits x
    classes), the rest per fit. Written out instead of autograd's: no graph, and the softmax
    gradient made in place in the logits' memory."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, classes: int,
                 weight_decays: list[float], preconditioners: list[Preconditioner]):
        self.z, self.y, self.classes = z, y, classes
        self.weight_decays, self.preconditioners = weight_decays, preconditioners

    def __call__(self, asked: dict[int, tuple[torch.Tensor, torch.Tensor]]
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = sorted(asked)
        z, n, c = self.z, len(self.z), self.classes
        with torch.no_grad():
            weights = [self.preconditioners[i].weight(asked[i][0]) for i in order]
            stacked = torch.cat(weights)
            biases = torch.cat([asked[i][1] for i in order])
            if z.dtype == torch.float32:
                logits = _product(z, stacked.T).add_(biases)
            else:  # bfloat16 features: the product in bfloat16, accumulated in float32
                logits = (z @ stacked.T.to(z.dtype)).float().add_(biases)
            logits = logits.view(n, len(order), c)
            normaliser = logits.logsumexp(2, keepdim=True)
            labels = self.y.view(n, 1, 1).expand(n, len(order), 1)
            data_loss = (normaliser - logits.gather(2, labels)).mean(0).view(-1)
            slopes = logits.sub_(normaliser).exp_()  # the softmax, then minus the one-hot
            slopes.scatter_add_(2, labels, torch.full(labels.shape, -1.0))
            slopes.div_(n)
            flat = slopes.view(n, len(order) * c)
            gradient = (_product(flat.T, z) if z.dtype == torch.float32
                        else (flat.T.to(z.dtype) @ z).float())
            answers = {}
            for j, i in enumerate(order):
                weight, decay = weights[j], self.weight_decays[i]
                weight_gradient = gradient[j * c:(j + 1) * c].add_(weight, alpha=decay)
                loss = data_loss[j] + 0.5 * decay * weight.pow(2).sum()
                answers[i] = (loss, self.preconditioners[i].gradient(weight_gradient),
                              slopes[:, j].sum(0), weight_gradient)
        return answers


def fit_logistic_many(x: torch.Tensor, y: torch.Tensor, classes: int,
                      weight_decays: list[float] | tuple[float, ...], iterations: int = 100,
                      starts: list[LinearProbe | None] | None = None, precision: str = "fp32",
                      standardized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      correlation: FeatureCorrelation | None = None) -> list[LinearProbe]:
    """``fit_logistic`` for each penalty, every fit its own L-BFGS, their evaluations made
    together (terabrain.analysis.lockstep): a round of four costs about two evaluations of
    one fit, not four (the products with 10 columns run far below the GEMM rate)."""
    z, mean, scale = standardized if standardized is not None else standardize(x, precision)
    correlation = correlation if correlation is not None else FeatureCorrelation.of(z)
    decays = list(weight_decays)
    starts = starts if starts is not None else [None] * len(decays)
    preconditioners = [correlation.preconditioner(wd) for wd in decays]
    objective = _LogisticObjective(z, y, classes, decays, preconditioners)

    def solver(index: int):
        def solve(evaluate) -> LinearProbe:
            start = starts[index]
            weight = torch.zeros(classes, z.shape[1]) if start is None else start.weight.clone()
            coordinates = preconditioners[index].coordinates(weight).contiguous()
            bias = torch.zeros(classes) if start is None else start.bias.clone()
            optimizer = torch.optim.LBFGS([coordinates, bias], lr=1.0, max_iter=iterations,
                                          history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
                                          tolerance_grad=1e-5, tolerance_change=1e-7)
            last: dict[str, torch.Tensor] = {}

            def closure():
                loss, coordinates.grad, bias.grad, last["weight_gradient"] = evaluate(
                    (coordinates, bias))
                return loss

            optimizer.step(closure)
            closure()  # the gradient where it stopped
            state = optimizer.state[coordinates]  # L-BFGS keeps its counters there
            gradient = max(float(last["weight_gradient"].abs().max()),
                           float(bias.grad.abs().max()))
            return LinearProbe(mean, scale, preconditioners[index].weight(coordinates).detach(),
                               bias.detach(), decays[index], int(state.get("n_iter", 0)),
                               gradient)
        return solve

    return run_in_lockstep([solver(i) for i in range(len(decays))], objective)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float,
                 iterations: int = 100, start: LinearProbe | None = None,
                 precision: str = "fp32",
                 standardized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 correlation: FeatureCorrelation | None = None) -> LinearProbe:
    """Standardize features (train statistics), then minimise mean cross-entropy
    + weight_decay/2 ||W||^2 by full-batch L-BFGS: a convex problem, so the result does not
    depend on a seed. From zero, or from ``start``'s weights (a warm start: the solution for a
    nearby penalty or a subset of the rows, which needs fewer iterations to the same optimum).
    L-BFGS runs in coordinates preconditioned by the features' correlation (``Preconditioner``;
    ``correlation`` made already, or made here from the standardised features).

    ``precision="bf16"`` keeps the standardised features in bfloat16 and runs the two
    products per evaluation (logits, weight gradient) in bfloat16 with float32 accumulation;
    the weights, the loss and the L-BFGS state stay float32 (on a CPU with bfloat16 in
    hardware: 0.25 against 0.72 s per evaluation on 48,000 x 6,400 features, docs/analysis.md).
    ``standardized``: (z, mean, scale) of x made already."""
    return fit_logistic_many(x, y, classes, [weight_decay], iterations, [start], precision,
                             standardized, correlation)[0]


@dataclass
class PenaltyChoice:
    """The L2 penalty with the best validation accuracy, every penalty's accuracy, the
    chosen penalty's probe (fitted on the rows outside the validation part: a warm start for
    the refit) and the features' correlation (the refit's preconditioner)."""
    weight_decay: float
    scores: dict[float, float]
    probe: LinearProbe
    correlation: FeatureCorrelation


def choose_weight_decay(x: torch.Tensor, y: torch.Tensor, classes: int,
                        weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                        validation_fraction: float = 0.2, seed: int = 0,
                        iterations: int = 100, precision: str = "fp32") -> PenaltyChoice:
    """The L2 penalty with the best accuracy on a seeded validation part of (x, y), fitted on
    the rest, every penalty from zero (their fits made together); and every penalty's
    validation accuracy. Only (x, y) is seen: pass the training split, never the test split.
    Ties go to the penalty listed first."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = max(1, int(len(x) * validation_fraction))
    val, fit = order[:held], order[held:]
    x_fit, y_fit = x[fit], y[fit]
    x_val, y_val = x[val], y[val]
    standardized = standardize(x_fit, precision)  # once for every penalty
    correlation = FeatureCorrelation.of(standardized[0])
    probes = dict(zip(weight_decays, fit_logistic_many(
        x_fit, y_fit, classes, weight_decays, iterations, standardized=standardized,
        correlation=correlation)))
    scores = {wd: probes[wd].accuracy(x_val, y_val) for wd in weight_decays}
    best = max(weight_decays, key=lambda wd: (scores[wd], -weight_decays.index(wd)))
    return PenaltyChoice(best, scores, probes[best], correlation)


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int | None = None,
                weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
                validation_fraction: float = 0.2, seed: int = 0) -> LinearProbe:
    """Choose the L2 penalty on a seeded validation part of (x, y), then refit on all of it."""
    classes = classes or int(y.max()) + 1
    choice = choose_weight_decay(x, y, classes, weight_decays, validation_fraction, seed)
    return fit_logistic(x, y, classes, choice.weight_decay, start=choice.probe,
                        correlation=choice.correlation)
