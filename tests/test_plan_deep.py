"""`terabrain plan` for the papers' networks: parameter counts match the papers, per-layer
figures follow from the layer shapes, the model axis counts halos."""

import json

import pytest
import torch

from terabrain.config.loader import load_experiment
from terabrain.capacity import plan_experiment
from terabrain.learners.deep_capacity import active_layer_sets, layer_table


@pytest.mark.parametrize("name, seed_count", [
    ("yfcc-15b", 15e9),   # Ni et al. 2015
    ("le2012-1b", 1e9),   # Le et al. 2012, as quoted by Ni et al. 2015 and Coates et al. 2013
    ("cots-11b", 11.2e9),  # Coates et al. 2013
])
def test_seed_networks_have_the_seeds_parameter_counts(name, seed_count):
    plan = plan_experiment(load_experiment(name), devices=64, device_memory=80 * 10**9)
    assert abs(plan.parameters / seed_count - 1) < 0.02, plan.parameters


def test_yfcc_layers_follow_the_seed_text():
    table = layer_table(load_experiment("yfcc-15b"))
    first, second, third = table
    assert first["codes"] == [24, 72, 72]  # 5184 = 72 x 72 fields of 16x16x3
    assert first["filter_parameters"] == 72 * 72 * 24 * 16 * 16 * 3
    assert second["codes"] == [384, 62, 62]  # 62 x 62 fields, each 4x4x24 outputs
    assert second["filter_parameters"] == 62 * 62 * 384 * 16 * 16 * 24
    assert third["filter_parameters"] == 4096 * 384 * 62 * 62
    # A local layer does one multiply-add per weight per example (encode), again to
    # reconstruct: 2 x 2 FLOPs.
    assert first["forward_flops_per_example"] == 4 * first["filter_parameters"]


def test_model_axis_splits_local_rows_and_counts_halos():
    config = load_experiment("yfcc-15b")
    plan = plan_experiment(config, devices=8, device_memory=80 * 10**9)
    by_model = {split.model: split for split in plan.splits}
    assert by_model[1].model_axis_sent == 0
    # Halved model axis: roughly half the weights per rank, and bytes on the model axis.
    assert 0.45 < by_model[2].weights / by_model[1].weights < 0.56
    assert by_model[2].model_axis_sent > 0 and by_model[8].model_axis_sent > by_model[2].model_axis_sent
    assert not plan_experiment(config, devices=128, device_memory=80 * 10**9).splits[-1].valid


def test_plan_cli_prints_the_layer_table(cli):
    result = cli("plan", "le2012-1b", "--gpus", "4", "--gpu-memory", "80GB", check=True)
    assert "local  3x200x200 -> 16x183x183 -> 16x90x90" in result.stdout
    data = json.loads(cli("plan", "cots-11b", "--gpus", "16", "--gpu-memory", "80GB", "--json",
                          check=True).stdout)
    assert [row["layer"] for row in data["layers"]] == [1, 2, 3]


SMALL = ["data.patch_size=24", "train.batch_size=16", "model.layers.0.steps=null",
         "optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.01"]


def test_active_layer_sets_replay_the_schedule():
    def sets(*overrides):
        return active_layer_sets(load_experiment("yfcc-15b-small", SMALL + list(overrides)))

    assert sets("model.schedule=greedy") == [[0], [1], [2]]
    # Layer 2 starts after 40 of layer 1's 150 steps, layer 3 after 40 of layer 2's.
    assert sets("model.schedule=pipelined", "model.start_after=40") == [[0], [0, 1], [0, 1, 2]]
    # Layer 1 has only 30 steps: layer 3 starts (at 70) after it has finished.
    assert sets("model.schedule=pipelined", "model.start_after=40", "model.layers.0.steps=30") == [
        [0], [1], [1, 2]]
    # start_after >= every budget: one layer at a time, as yfcc-15b is configured.
    assert sets("model.schedule=pipelined", "model.start_after=150") == [[0], [1], [2]]
    # Early stopping can start a layer sooner: all at once, the worst case.
    assert sets("model.schedule=pipelined", "train.early_stopping.patience=2") == [[0, 1, 2]]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("overrides", [
    ["model.schedule=greedy"],
    ["model.schedule=pipelined", "model.start_after=40"],
    ["model.schedule=pipelined", "model.start_after=40", "model.forward_copies=bf16"],
], ids=["greedy", "pipelined", "pipelined-bf16-copies"])
def test_weights_gradients_and_optimizer_state_are_what_a_step_holds(overrides):
    """The planner's weights, gradients and optimizer state for one rank against the
    tensors a real layer-wise step holds at the schedule's peak (every layer of the largest
    concurrent set active): byte for byte."""
    from terabrain.learners.deep import DeepLearner
    from terabrain.learners.layerwise import LayerSchedule, LayerwiseObjective
    from terabrain.train.optim import build_optimizer

    config = load_experiment("yfcc-15b-small", SMALL + overrides)
    shape = (24, 24, 3)
    learner = DeepLearner()
    figures = learner.capacity(config, shape).per_rank(1, 1, 16)
    network = learner.build(config, shape, seed=0)
    training = learner.training(config, network, _OneRank(), shape)
    model, schedule = training.model, training.schedule
    assert isinstance(schedule, LayerSchedule) and isinstance(training.objective, LayerwiseObjective)
    assert _bytes(model.parameters()) == figures.weights

    peak = max(active_layer_sets(config), key=lambda s: sum(
        p.numel() for k in s for p in network.layers[k].parameters()))
    schedule.started_at = [0 if k <= max(peak) else -1 for k in range(len(schedule.budgets))]
    schedule.finished = [k < min(peak) for k in range(len(schedule.budgets))]
    optimizer = build_optimizer(config.optimizer, training.parameters)
    loss, _ = training.objective(model, torch.randn(16, 24 * 24 * 3))
    loss.backward()
    assert _bytes(p.grad for p in model.parameters() if p.grad is not None) == figures.gradients
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert _bytes(state) == figures.optimizer


class _OneRank:  # what DeepLearner.training reads of a Parallelism on one process
    model_ranks = 1


def test_yfcc_15b_on_one_h200_names_the_schedule_that_fits(cli):
    """As configured (pipelined, fp32 forward copies) it does not fit 141 GB; greedy
    training, which keeps no copies and trains one layer at a time, does, and the plan
    shows the sum."""
    plan = plan_experiment(load_experiment("yfcc-15b"), devices=1, device_memory=141 * 10**9)
    assert not any(split.fits for split in plan.splits)
    assert plan.fits_with["settings"] == ["model.schedule=greedy"]
    split = plan.fits_with["split"]
    parts = ("weights", "gradients", "optimizer", "activations", "dataset", "bf16_copy")
    assert split["total"] == sum(split[p] for p in parts) <= plan.usable_memory
    assert split["weights"] == 4 * plan.parameters  # no forward copies
    assert split["gradients"] == 4 * max(row["parameters"] for row in plan.layers)
    result = cli("plan", "yfcc-15b", "--gpus", "1", "--gpu-memory", "141GB", check=True)
    assert "it fits with --set model.schedule=greedy, on parallel.data=1 parallel.model=1: " \
           "weights 60.9 GB + grads" in " ".join(result.stdout.split())
