"""Deep networks trained layer by layer: every layer's objective falls under both schedules,
a resumed pipelined run continues exactly, the stack fine-tunes with a supervised head."""

import json

import pytest
import torch
from safetensors.torch import load_file

from terabrain.config.loader import load_experiment
from terabrain.learners import layerwise
from terabrain.errors import ConfigError
from terabrain.learners.registry import build_network
from terabrain.train.run import run_experiment

SMALL_DEEP = [
    "data.patch_size=24", "data.num_patches=768", "data.holdout_patches=96",
    "train.batch_size=96", "train.steps=12", "train.log_every=2", "train.checkpoint_every=6",
    "model.start_after=6", "model.sync_every=2", "train.progress=false", "model.layers.0.steps=null",
]


def _layer_losses(run_dir):
    losses: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for key, value in json.loads(line).items():
            if key.endswith("/loss"):
                losses.setdefault(key, []).append(value)
    return losses


@pytest.mark.parametrize("schedule", ["greedy", "pipelined"])
def test_every_layer_objective_falls(tmp_path, schedule):
    config = load_experiment("yfcc-15b-small", SMALL_DEEP + [f"model.schedule={schedule}"])
    results = run_experiment(config, tmp_path)
    losses = _layer_losses(tmp_path)
    assert sorted(losses) == ["layer1/loss", "layer2/loss", "layer3/loss"]
    for key, values in losses.items():
        assert values[-1] < 0.9 * values[0], (key, values)
    layers = results["features"]["layers"]
    assert [layer["steps"] for layer in layers] == [12, 12, 12]
    starts = [layer["started_at_step"] for layer in layers]
    # greedy: each layer starts when the one below has spent its budget; pipelined: after
    # start_after of its steps, while the one below goes on training.
    assert starts == ([0, 12, 24] if schedule == "greedy" else [0, 6, 12])
    assert results["features"]["steps"] == (36 if schedule == "greedy" else 24)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert not any("forward_copies" in key for key in weights)
    assert (tmp_path / "filters.png").exists()
    if schedule == "greedy":  # analysis reads any layer of the trained stack
        from terabrain.cli import main

        assert main(["analyze", str(tmp_path), "--layer", "2", "--concepts", "faces",
                     "--random-networks", "1", "--maximize-steps", "10",
                     "--max-examples", "200"]) == 0
        summary = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
        assert "Layer 2" in (tmp_path / "analysis" / "report.md").read_text()
        assert summary["layer"] == 2 and summary["concepts"]


def crash_at_step_10_then_resume(monkeypatch, overrides: list[str], run_dir):
    """yfcc-15b-small with ``overrides`` into ``run_dir``: the run raises after step 10 (as if
    killed), then the same call resumes it from its checkpoint; returns the results."""
    original = layerwise.LayerSchedule.on_step_end

    def crash_at_step_10(self, trainer, step, metrics):
        original(self, trainer, step, metrics)
        if step == 10:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(layerwise.LayerSchedule, "on_step_end", crash_at_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(load_experiment("yfcc-15b-small", overrides), run_dir)
    monkeypatch.setattr(layerwise.LayerSchedule, "on_step_end", original)
    return run_experiment(load_experiment("yfcc-15b-small", overrides), run_dir)


def test_pipelined_run_resumes_exactly(tmp_path, monkeypatch):
    overrides = SMALL_DEEP + ["model.schedule=pipelined", "train.checkpoint_every=4"]
    run_experiment(load_experiment("yfcc-15b-small", overrides), tmp_path / "whole")

    results = crash_at_step_10_then_resume(monkeypatch, overrides, tmp_path / "resumed")

    assert results["features"]["steps"] == 24
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)


def test_deep_stack_fine_tunes_with_a_classifier(tmp_path):
    config = load_experiment("digits-sae", [
        # Whole sections: digits-sae's autoencoder fields do not belong to a deep model.
        'model={kind: deep, layers: [{kind: local, maps: 8, kernel: 4, stride: 2}, '
        '{kind: dense, maps: 32}]}',
        "objective={kind: rica}", "optimizer.name=adam", "optimizer.lr=0.01",
        "data.remove_mean=false", "data.whitening=none",
        "train.steps=20", "train.batch_size=128", "train.progress=false",
        "supervised.fine_tune=true", "supervised.train.steps=150", "supervised.train.progress=false",
    ])
    results = run_experiment(config, tmp_path)
    assert results["supervised"]["test_accuracy"] > 0.85


def test_bad_deep_configs_name_the_field(cli):
    result = cli("train", "yfcc-15b-small", "--set", "model.schedule=pipelined",
                 "--set", "optimizer.name=lbfgs")
    assert result.returncode == 2 and "optimizer.name" in result.stderr
    result = cli("train", "yfcc-15b-small", "--set", "model.layers.0.lcn.kernel=4")
    assert result.returncode == 2 and "lcn.kernel" in result.stderr


def test_a_layer_that_does_not_fit_its_input_is_a_config_error():
    config = load_experiment("yfcc-15b-small", ["data.patch_size=6"])
    with pytest.raises(ConfigError, match=r"model.layers\[0\]: kernel_size 8 is larger"):
        build_network(config, (6, 6, 3))
    config = load_experiment("yfcc-15b-small", ["model.input_shape=[1, 48, 48]"])
    with pytest.raises(ConfigError, match="model.input_shape"):
        build_network(config, (48, 48, 3))


def test_data_parallel_deep_run_equals_one_process(tmp_path, cli):
    from conftest import torchrun

    overrides = SMALL_DEEP + ["model.schedule=pipelined", "train.steps=6", "model.start_after=3"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    cli("train", "yfcc-15b-small", *sets, "--out", str(tmp_path / "one"), check=True)
    result = torchrun(2, "-m", "terabrain", "train", "yfcc-15b-small", *sets,
                      "--set", "parallel.data=2", "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("setting, field", [
    ("parallel.compression=onebit", "parallel.compression"),
    ("parallel.mode=hogwild", "parallel.mode"),
])
def test_communication_schemes_without_layerwise_support_are_refused(setting, field):
    with pytest.raises(ConfigError, match=field):
        load_experiment("yfcc-15b-small", [setting, "parallel.workers=2"])


def test_reset_parameters_redraws_the_constructed_values():
    from terabrain.config.schema import LayerConfig
    from terabrain.nn.deep import DeepNetwork

    layers = [LayerConfig(kind="local", maps=4, kernel=4, stride=2, tied=False),
              LayerConfig(kind="conv", maps=4, kernel=3, tied=False),
              LayerConfig(kind="dense", maps=8, tied=False)]
    network = DeepNetwork(layers, (1, 12, 12), seed=3)
    built = {k: v.clone() for k, v in network.state_dict().items()}
    for parameter in network.parameters():
        parameter.data.add_(1.0)
    network.reset_parameters()
    for key, value in network.state_dict().items():
        assert torch.equal(value, built[key]), key
    # An untied decoder draws from its own seed, not the encoder's.
    assert not torch.equal(built["layers.2.encoder.weight"], built["layers.2.decoder.weight"])


def test_deep_network_apply_visits_modules_like_any_module():
    # FilterBank's linear map is its ``fmap``: nn.Module.apply is not shadowed.
    from terabrain.config.schema import LayerConfig
    from terabrain.nn.deep import DeepNetwork, FilterBank, RICALayer

    layers = [LayerConfig(kind="local", maps=4, kernel=4, stride=2, tied=False),
              LayerConfig(kind="conv", maps=4, kernel=3),
              LayerConfig(kind="dense", maps=8)]
    network = DeepNetwork(layers, (1, 12, 12), seed=3)
    visited = []
    assert network.apply(visited.append) is network
    assert len(visited) == len(list(network.modules()))
    assert {id(m) for m in visited} == {id(m) for m in network.modules()}
    assert visited[-1] is network  # children first, then the module itself
    banks = [m for m in visited if isinstance(m, FilterBank)]
    assert len(banks) == 4  # local: encoder and decoder; conv and dense: tied, one bank each
    built = {k: v.clone() for k, v in network.state_dict().items()}
    for parameter in network.parameters():
        parameter.data.add_(1.0)
    network.apply(lambda m: m.reset_parameters() if isinstance(m, RICALayer) else None)
    for key, value in network.state_dict().items():
        assert torch.equal(value, built[key]), key


def _small_network():
    from terabrain.config.schema import LayerConfig
    from terabrain.nn.deep import DeepNetwork

    layers = [LayerConfig(kind="local", maps=4, kernel=4, stride=2),
              LayerConfig(kind="conv", maps=4, kernel=3, tied=False),
              LayerConfig(kind="dense", maps=8)]
    return DeepNetwork(layers, (1, 12, 12), seed=3)


def test_forward_copies_only_where_a_layer_trains_under_a_newer_one():
    """Greedy: no copies (a finished layer feeds the next itself). Pipelined: copies of
    every layer but the top one, frozen, in bf16 if asked, computing codes close to the
    layer's own and handing them on in the input's dtype."""
    network = _small_network()
    greedy = layerwise.LayerwiseModel(network, copies=False)
    assert len(greedy.forward_copies) == 0 and greedy.forward_layer(1) is network.layers[1]
    pipelined = layerwise.LayerwiseModel(network, copies=True, copy_dtype=torch.bfloat16)
    assert len(pipelined.forward_copies) == 2
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad
               for p in pipelined.forward_copies.parameters())
    h = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        got, want = pipelined.encode_below(0, h), network.layers[0].encode(h)
    assert got.dtype == torch.float32
    assert (got - want).norm() < 0.02 * want.norm()
    with torch.no_grad():
        network.layers[0].encoder.weight.mul_(-1)
    pipelined.sync_(0)
    with torch.no_grad():
        assert (pipelined.encode_below(0, h) + want).norm() < 0.02 * want.norm()


class _Steps:  # the two things LayerSchedule asks of the trainer
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.stop_reason = None

    def request_stop(self, reason):
        self.stop_reason = reason


def test_a_finished_layer_keeps_no_optimizer_state_and_is_not_renormalised():
    network = _small_network()
    model = layerwise.LayerwiseModel(network, copies=True)
    schedule = layerwise.LayerSchedule(model, [2, 4, 4], "pipelined", start_after=1, sync_every=1)
    objective = layerwise.LayerwiseObjective(schedule, [0.1, 0.1, 0.1], 0.01)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    trainer = _Steps(optimizer)
    x = torch.randn(8, 144)
    for step in (1, 2):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(model, x)
        loss.backward()
        optimizer.step()
        objective.after_step(model)
        schedule.on_step_end(trainer, step, {})
    assert schedule.finished[0] and schedule.active() == [1, 2]
    first = set(network.layers[0].parameters())
    assert not first & set(optimizer.state)
    assert set(network.layers[1].parameters()) <= set(optimizer.state)
    # Off the unit sphere on purpose: only the layers that train are renormalised.
    with torch.no_grad():
        for layer in network.layers:
            layer.encoder.weight.mul_(2.0)
    objective.after_step(model)
    norms = [layer.encoder.weight.norm(dim=-1) for layer in network.layers]
    torch.testing.assert_close(norms[0], torch.full_like(norms[0], 2.0))
    for later in norms[1:]:
        torch.testing.assert_close(later, torch.ones_like(later))
