"""The linear probe's fit: standardisation, the correlation preconditioner, several
penalties fitted in lockstep, and the lockstep runner itself."""

import threading

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from terabrain.analysis import probe
from terabrain.analysis.lockstep import run_in_lockstep
from terabrain.analysis.probe import (
    FeatureCorrelation, choose_weight_decay, fit_logistic, fit_logistic_many, standardize,
)


def correlated_problem(rows=600, features=120, latents=12, seed=0):
    """Features that are a few latent directions seen many times over (like pooled codes of
    neighbouring filters), plus a little independent noise; labels from a linear rule."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, latents, generator=g)
    x = latent @ torch.randn(latents, features, generator=g) * 3
    x += 0.1 * torch.randn(rows, features, generator=g)
    y = (latent @ torch.randn(latents, 5, generator=g)).argmax(dim=1)
    return x, y


def objective(x, y, fit):
    z, _, _ = standardize(x)
    return float(F.cross_entropy(z @ fit.weight.T + fit.bias, y)
                 + 0.5 * fit.weight_decay * fit.weight.pow(2).sum())


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 2500), features=st.integers(1, 7), half=st.booleans(),
       offset=st.sampled_from([0.0, 1.0, 300.0]))
def test_standardize_equals_the_formula_and_leaves_its_input_alone(rows, features, half,
                                                                  offset):
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(rows)) + offset
    x = x.half() if half else x
    before = x.clone()
    z, mean, scale = standardize(x)
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale.double(), exact.std(0).clamp_min(1e-6), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(z, ((x.float() - mean) / scale), rtol=0, atol=0)
    assert torch.equal(x, before)  # a float32 input is not squared or shifted in place


def rectified_problem(rows=2000, features=400, latents=60, seed=0):
    """Rectified random projections of a few latent variables (like pooled codes of
    neighbouring filters: many features, strongly correlated), labels from a linear rule on
    the latents."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, latents, generator=g)
    x = torch.relu(latent @ torch.randn(latents, features, generator=g))
    return x, (latent @ torch.randn(latents, 5, generator=g)).argmax(dim=1)


def test_preconditioning_reaches_the_same_optimum_in_far_fewer_iterations():
    """Convex: with or without the change of variables the long fits end at the same
    objective; after 40 iterations plain L-BFGS is still well above it, the preconditioned
    fit is on it (measured: 6.6e-3 against 9e-5 relative)."""
    x, y = rectified_problem()
    correlated, plain = FeatureCorrelation.of(standardize(x)[0]), FeatureCorrelation(None)
    long = [objective(x, y, fit_logistic(x, y, 5, 1e-4, 300, correlation=c))
            for c in (correlated, plain)]
    optimum = min(long)
    assert max(long) - optimum < 1e-3 * optimum
    quick = objective(x, y, fit_logistic(x, y, 5, 1e-4, 40, correlation=correlated))
    slow = objective(x, y, fit_logistic(x, y, 5, 1e-4, 40, correlation=plain))
    assert quick - optimum < 1e-3 * optimum
    assert slow - optimum > 3e-3 * optimum


def test_penalties_fitted_together_equal_each_fitted_alone():
    x, y = correlated_problem(seed=1)
    decays = [1e-1, 1e-2, 1e-3]
    together = fit_logistic_many(x, y, 5, decays, 60)
    for decay, fit in zip(decays, together):
        alone = fit_logistic(x, y, 5, decay, 60)
        assert fit.weight_decay == decay
        # Float32 products of 15 columns and of 5 round differently; 60 iterations carry
        # that forward, far below the weights' own scale.
        scale = float(alone.weight.abs().max())
        torch.testing.assert_close(fit.weight, alone.weight, rtol=0, atol=1e-3 * scale)
        assert abs(fit.iterations - alone.iterations) <= 1
    # The penalty did something: the weights shrink as it grows.
    norms = [float(fit.weight.norm()) for fit in together]
    assert norms[0] < norms[1] < norms[2]


def test_the_penalty_choice_sees_only_its_rows_and_returns_a_warm_start():
    x, y = correlated_problem(rows=800, seed=2)
    choice = choose_weight_decay(x, y, 5, (1e-1, 1e-3), iterations=60)
    assert set(choice.scores) == {1e-1, 1e-3}
    assert choice.weight_decay == max(choice.scores, key=choice.scores.get)
    assert choice.probe.weight_decay == choice.weight_decay
    assert choice.correlation.matrix.shape == (x.shape[1], x.shape[1])
    # Replacing rows outside the seeded validation part changes nothing of the choice but
    # the fits; replacing the validation rows' labels changes the scores (they are used).
    order = torch.randperm(800, generator=torch.Generator().manual_seed(0))
    shuffled = y.clone()
    shuffled[order[:160]] = (y[order[:160]] + 1) % 5
    assert choose_weight_decay(x, shuffled, 5, (1e-1, 1e-3), iterations=60).scores != choice.scores


def test_too_many_features_are_fitted_without_a_preconditioner(monkeypatch):
    monkeypatch.setattr(probe, "PRECONDITIONED_FEATURES", 10)
    x, y = correlated_problem(features=20)
    assert FeatureCorrelation.of(standardize(x)[0]).matrix is None
    fit = fit_logistic(x, y, 5, 1e-2, 50)
    assert fit.accuracy(x, y) > 0.8


def test_a_correlation_that_will_not_factor_leaves_the_fit_unpreconditioned(monkeypatch):
    """Four ridges that each leave C + ridge I indefinite: no factor, and the fit still runs
    (plainly) to a good probe."""
    monkeypatch.setattr(probe, "CORRELATION_FLOOR", -1e3)
    x, y = correlated_problem(features=20)
    correlation = FeatureCorrelation.of(standardize(x)[0])
    assert correlation.preconditioner(0.0).factor is None
    assert fit_logistic(x, y, 5, 1e-2, 100, correlation=correlation).accuracy(x, y) > 0.8


def lockstep_solver(evaluations):
    def solve(evaluate):
        return [evaluate(i) for i in range(evaluations)]
    return solve


def test_lockstep_answers_every_unfinished_solver_in_one_batch_per_round():
    rounds = []

    def batch(asked):
        rounds.append(sorted(asked))
        return {index: (index, value) for index, value in asked.items()}

    results = run_in_lockstep([lockstep_solver(n) for n in (3, 5, 1)], batch)
    assert results == [[(0, i) for i in range(3)], [(1, i) for i in range(5)], [(2, 0)]]
    assert rounds == [[0, 1, 2], [0, 1], [0, 1], [1], [1]]


def run_with_deadline(function, seconds=20):
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the lockstep deadlocked"
    return outcome


def test_a_failing_solver_stops_the_others_and_its_error_is_raised():
    def failing(evaluate):
        evaluate(0)
        raise ValueError("solver 1 broke")

    outcome = run_with_deadline(lambda: run_in_lockstep(
        [lockstep_solver(50), failing, lockstep_solver(50)],
        lambda asked: dict(asked)))
    assert isinstance(outcome.get("error"), ValueError)


def test_a_failing_batch_stops_every_solver_and_its_error_is_raised():
    def batch(asked):
        if len(asked) < 3:
            raise ArithmeticError("batch broke")
        return dict(asked)

    outcome = run_with_deadline(lambda: run_in_lockstep(
        [lockstep_solver(n) for n in (1, 4, 4)], batch))
    assert isinstance(outcome.get("error"), ArithmeticError)


def test_the_command_line_default_is_the_evaluations_own():
    from terabrain.analysis.evaluate import EvaluateOptions
    from terabrain.cli import build_parser

    args = build_parser().parse_args(["evaluate", "RUN"])
    assert args.probe_iterations == EvaluateOptions().probe_iterations
