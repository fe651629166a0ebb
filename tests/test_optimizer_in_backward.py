"""train.optimizer_in_backward: each parameter is updated inside the backward pass as soon
as its gradient is complete, and that gradient freed. Same updates as stepping after the
backward pass (SGD with momentum, Adam; a tied autoencoder and a layer-wise deep network),
no gradient left after a step, refused where it cannot work, and counted by the planner."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from terabrain.capacity import plan_experiment
from terabrain.config.loader import load_experiment
from terabrain.errors import ConfigError
from terabrain.train.run import run_experiment
from terabrain.train.stage import feature_trainer


def _rows(rows=512, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, size, generator=generator)
    return torch.randn(rows, 6, generator=generator) @ basis + 0.1 * torch.randn(rows, size, generator=generator)


@pytest.mark.parametrize("optimizer", [
    ["optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.001"],
    ["optimizer.name=adam", "optimizer.lr=0.01"],
], ids=["sgd-momentum", "adam"])
def test_updates_in_backward_equal_updates_after_it(optimizer):
    weights, states = [], []
    for in_backward in (False, True):
        config = load_experiment("natural-patches-rica", [
            'model={kind: autoencoder, hidden: 24, tied: true}', "objective={kind: reconstruction}",
            "train.steps=15", "train.batch_size=64",
            f"train.optimizer_in_backward={str(in_backward).lower()}", *optimizer])
        stage = feature_trainer(config, (8, 8), inputs=_rows())
        stage.trainer.fit()
        if in_backward:  # no gradient outlives the backward pass
            assert all(p.grad is None for p in stage.network.parameters())
        weights.append(stage.network.state_dict())
        optimizer_ = stage.trainer.optimizer
        states.append([optimizer_.state[p] for g in optimizer_.param_groups for p in g["params"]])
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    for ours, theirs in zip(states[1], states[0]):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), name


def test_a_layerwise_deep_run_is_the_same_in_backward(tmp_path):
    overrides = [
        "data.patch_size=24", "data.num_patches=192", "data.holdout_patches=48",
        "train.batch_size=48", "train.steps=4", "model.layers.0.steps=null",
        "model.schedule=pipelined", "model.start_after=2", "train.progress=false",
        "optimizer.name=adam"]
    run_experiment(load_experiment("yfcc-15b-small", overrides), tmp_path / "after")
    run_experiment(load_experiment("yfcc-15b-small", overrides + ["train.optimizer_in_backward=true"]),
                   tmp_path / "in")
    after = load_file(str(tmp_path / "after" / "model.safetensors"))
    inside = load_file(str(tmp_path / "in" / "model.safetensors"))
    for key in after:
        assert torch.equal(inside[key], after[key]), key


@pytest.mark.parametrize("overrides, field", [
    (["optimizer.name=lbfgs"], "L-BFGS needs every gradient"),
    (['model={kind: autoencoder, hidden: 8}', "objective={kind: reconstruction, weight_decay: 0.1}",
      "optimizer.name=sgd"], "objective.weight_decay"),
], ids=["lbfgs", "objective-decay"])
def test_refused_in_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as refused:
        load_experiment("natural-patches-rica", ["train.optimizer_in_backward=true", *overrides])
    assert "train.optimizer_in_backward" in str(refused.value) and field in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_planner_counts_one_tensor_s_gradient():
    """yfcc-15b (greedy, SGD): without it, the largest layer's parameters; with it, the
    largest single tensor of that layer (its filter bank), which is most of it."""
    base = ["model.schedule=greedy"]
    after = plan_experiment(load_experiment("yfcc-15b", base), 1, 141 * 10**9).splits[0]
    inside = plan_experiment(load_experiment("yfcc-15b", base + ["train.optimizer_in_backward=true"]),
                             1, 141 * 10**9).splits[0]
    from terabrain.learners.deep_capacity import layer_table

    table = layer_table(load_experiment("yfcc-15b"))
    largest_layer = max(row["parameters"] for row in table)
    largest_bank = max(row["filter_parameters"] // row["banks"] for row in table)
    assert after.gradients == 4 * largest_layer
    assert inside.gradients == 4 * largest_bank < after.gradients


@pytest.mark.slow
def test_on_two_model_ranks_the_same_and_refused_on_two_data_ranks(tmp_path, cli):
    """A 1 x 2 DTensor model mesh: the same losses with the updates in the backward pass.
    2 data ranks: refused in one line (the gradients are averaged after the backward)."""
    import json

    from conftest import torchrun

    sets = [arg for item in [
        "optimizer.momentum=0.9", "train.steps=5", "train.progress=false",
        "data.num_patches=200", "data.holdout_patches=40", "model.hidden=64",
        "train.log_every=1"] for arg in ("--set", item)]
    losses = []
    for in_backward in ("false", "true"):
        out = tmp_path / in_backward
        result = torchrun(2, "-m", "terabrain", "train", "lbann-ae-small", *sets,
                          "--set", "parallel.model=2", "--set",
                          f"train.optimizer_in_backward={in_backward}", "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append([row["loss"] for row in rows if "loss" in row])
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    result = torchrun(2, "-m", "terabrain", "train", "lbann-ae-small", *sets,
                      "--set", "parallel.data=2", "--set", "parallel.model=1",
                      "--set", "train.optimizer_in_backward=true", "--out", str(tmp_path / "data"))
    assert result.returncode != 0
    assert "train.optimizer_in_backward: with parallel.data > 1" in result.stderr
