"""precision bf16-weights (terabrain.train.bf16_weights): unbiased stochastic rounding,
torch.optim's update rules on fp32 state, training that tracks fp32 on CPU (the fully
connected and the deep path), an exact resume, the planner's bytes and the config rule."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from test_layerwise import crash_at_step_10_then_resume

from terabrain.capacity import plan_experiment
from terabrain.config.loader import load_experiment
from terabrain.errors import ConfigError
from terabrain.train.bf16_weights import StochasticRoundingOptimizer, stochastic_round_
from terabrain.train.run import run_experiment
from terabrain.train.stage import feature_trainer


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(sign):
    value = sign * (1.0 + 3 * 2**-10)  # bf16 neighbours 1.0 and 1.0078125; 3/8 of the way
    rounded = stochastic_round_(torch.full((400_000,), value), torch.Generator().manual_seed(1))
    assert rounded.dtype == torch.bfloat16
    assert set(rounded.float().abs().unique().tolist()) == {1.0, 1.0078125}
    up = (rounded.float().abs() > 1.0).double().mean().item()
    assert abs(up - 3 / 8) < 5 * (3 / 8 * 5 / 8 / 400_000) ** 0.5  # 5 standard deviations
    # Exact bf16 values are kept as they are.
    exact = torch.tensor([0.5, -2.0, 1.0078125, 0.0])
    assert torch.equal(stochastic_round_(exact.clone(), torch.Generator()).float(), exact)


@pytest.mark.parametrize("kind, reference", [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01)),
])
def test_updates_follow_torch_optim_on_fp32_parameters(kind, reference):
    """Unrounded (an fp32 parameter), the update and the state are torch.optim's; in
    pieces (a parameter larger than a piece) as in one."""
    from terabrain.train import bf16_weights

    torch.manual_seed(0)
    ours_param = torch.nn.Parameter(torch.randn(1000))
    theirs_param = torch.nn.Parameter(ours_param.detach().clone())
    lr = 0.1 if kind == "sgd" else 0.01
    ours = StochasticRoundingOptimizer([ours_param], kind, lr=lr, momentum=0.9, nesterov=True,
                                       weight_decay=0.01)
    theirs = reference([theirs_param])
    chunk, bf16_weights.CHUNK = bf16_weights.CHUNK, 300
    try:
        for _ in range(6):
            gradient = torch.randn(1000)
            ours_param.grad, theirs_param.grad = gradient.clone(), gradient.clone()
            ours.step()
            theirs.step()
    finally:
        bf16_weights.CHUNK = chunk
    torch.testing.assert_close(ours_param, theirs_param, rtol=1e-6, atol=1e-7)
    for key, value in theirs.state[theirs_param].items():
        torch.testing.assert_close(ours.state[ours_param][key].float(), value.float(),
                                   rtol=1e-6, atol=1e-7)


def _patches(rows=768, size=8, seed=0):
    """Rows with structure to learn: a few smooth components and some noise."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, size * size, generator=generator)
    return torch.randn(rows, 6, generator=generator) @ basis + 0.1 * torch.randn(
        rows, size * size, generator=generator)


def _train(precision: str, overrides: list[str]):
    config = load_experiment("natural-patches-rica", [
        f"precision={precision}", "optimizer.name=sgd", "optimizer.momentum=0.9",
        "optimizer.lr=0.0005", "train.steps=120", "train.batch_size=64", "model.hidden=24",
        *overrides])
    inputs = _patches()
    stage = feature_trainer(config, (8, 8), inputs=inputs)
    objective, model = stage.training.objective, stage.training.model

    def loss() -> float:  # on every row, in fp32
        with torch.no_grad():
            return float(objective(copy.deepcopy(model).float(), inputs)[0])

    before = loss()
    stage.trainer.fit()
    return stage, before, loss()


@pytest.mark.parametrize("kind", ["rica", "autoencoder"])
def test_training_in_bf16_weights_tracks_fp32(kind):
    overrides = (['model={kind: autoencoder, hidden: 24, tied: true}',
                  "objective={kind: reconstruction}"] if kind == "autoencoder" else [])
    ours, before, after = _train("bf16-weights", overrides)
    _, reference_before, reference_after = _train("fp32", overrides)
    weights = [p for p in ours.network.parameters()]
    assert all(p.dtype == torch.bfloat16 for p in weights)
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in weights)
    state = [v for s in ours.trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert state and all(v.dtype == torch.float32 for v in state)
    assert abs(before - reference_before) < 0.01 * reference_before
    assert after < 0.7 * before
    assert abs(after - reference_after) < 0.05 * reference_after


SMALL_DEEP = [
    "data.patch_size=24", "data.num_patches=384", "data.holdout_patches=48",
    "train.batch_size=48", "train.steps=8", "train.log_every=1", "train.checkpoint_every=4",
    "model.start_after=4", "model.sync_every=2", "train.progress=false",
    "model.layers.0.steps=null", "model.schedule=pipelined", "optimizer.name=adam",
    "precision=bf16-weights",
]


def test_deep_network_trains_in_bf16_weights_and_resumes_exactly(tmp_path, monkeypatch):
    """The deep path (local and dense layers through unit_row_map_pair) in bf16: every
    layer's loss falls, and a run stopped at step 10 resumes to the same weights (the
    rounding noise is seeded by parameter and step)."""
    config = load_experiment("yfcc-15b-small", SMALL_DEEP)
    run_experiment(config, tmp_path / "whole")
    losses: dict[str, list[float]] = {}
    for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines():
        for key, value in json.loads(line).items():
            if key.endswith("/loss"):
                losses.setdefault(key, []).append(value)
    assert sorted(losses) == ["layer1/loss", "layer2/loss", "layer3/loss"]
    for key, values in losses.items():
        assert values[-1] < values[0], (key, values)

    crash_at_step_10_then_resume(monkeypatch, SMALL_DEEP, tmp_path / "resumed")
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


def test_planner_counts_bf16_weights_and_gradients_and_fp32_state():
    fp32 = plan_experiment(load_experiment("lbann-ae-50k", ["optimizer.momentum=0.9"]), 1, 141 * 10**9)
    bf16 = plan_experiment(load_experiment("lbann-ae-50k", ["optimizer.momentum=0.9",
                                                            "precision=bf16-weights"]), 1, 141 * 10**9)
    ours, theirs = bf16.splits[0], fp32.splits[0]
    assert ours.weights == 2 * ours.local_parameters == theirs.weights // 2
    assert ours.gradients == theirs.gradients // 2
    assert ours.optimizer == 4 * ours.local_parameters + 4 * 3 * 2**22  # momentum, fp32 pieces
    assert ours.bf16_copy == 0  # the weights are already bf16: no autocast copy


def test_bf16_weights_needs_an_optimizer_it_can_round_for():
    with pytest.raises(ConfigError, match="precision bf16-weights .*optimizer.name"):
        load_experiment("natural-patches-rica", ["precision=bf16-weights"])  # lbfgs
    with pytest.raises(ConfigError, match="precision bf16-weights"):
        load_experiment("fashion-kmeans", ["precision=bf16-weights"])


@pytest.mark.slow
@pytest.mark.parametrize("split", ["parallel.data=2", "parallel.model=2"])
def test_bf16_weights_on_two_ranks_follow_one_process(tmp_path, cli, split):
    """2 real gloo ranks, data-parallel (replicas draw the same rounding noise, so they
    stay equal) or a 1 x 2 DTensor model mesh (each rank rounds its own shard): the loss of
    every step follows one process's."""
    from conftest import torchrun

    sets = [arg for item in [
        "precision=bf16-weights", "optimizer.momentum=0.9", "train.steps=6",
        "train.progress=false", "data.num_patches=200", "data.holdout_patches=40",
        "model.hidden=64", "train.log_every=1"] for arg in ("--set", item)]
    cli("train", "lbann-ae-small", *sets, "--out", str(tmp_path / "one"), check=True)
    result = torchrun(2, "-m", "terabrain", "train", "lbann-ae-small", *sets, "--set", split,
                      "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([row["loss"] for row in rows if "loss" in row])

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    torch.testing.assert_close(two, one, rtol=1e-3, atol=0)
