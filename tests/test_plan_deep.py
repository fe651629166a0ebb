"""`terabrain plan` for the papers' networks: parameter counts match the papers, per-layer
figures follow from the layer shapes, the model axis counts halos."""

import json

import pytest

from terabrain.config.loader import load_experiment
from terabrain.capacity import plan_experiment
from terabrain.learners.deep_capacity import layer_table


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
