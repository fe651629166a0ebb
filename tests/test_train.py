"""The trainer end to end: loss falls, runs resume exactly, NaN stops cleanly, outputs exist."""

import json

import pytest
import torch
from safetensors.torch import load_file

from terabrain.config.loader import load_experiment
from terabrain.train.checkpoint import CheckpointManager
from terabrain.train.run import run_experiment

SMALL_RICA = [
    "data.num_patches=3000", "data.holdout_patches=500", "data.whitening_fit_samples=3000",
    "model.hidden=32", "optimizer.max_iter=5", "train.steps=6", "train.checkpoint_every=3",
    "train.progress=false",
]
SMALL_SAE_ADAM = [
    "model.hidden=24", "model.dropout=0.2", "optimizer.name=adam", "optimizer.lr=0.01",
    "train.steps=12", "train.batch_size=64", "train.checkpoint_every=4", "train.log_every=2",
    "train.progress=false", "supervised.train.steps=30", "supervised.train.checkpoint_every=10",
    "supervised.train.progress=false",
]


def _losses(run_dir, stage="features"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["stage"] == stage]


def test_rica_loss_falls_and_run_directory_is_complete(tmp_path):
    run_experiment(load_experiment(None, SMALL_RICA), tmp_path)
    losses = _losses(tmp_path)
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    for name in ("config.yaml", "whitening.safetensors", "model.safetensors", "filters.png",
                 "results.json", "checkpoints/latest", "checkpoints/step_6/.metadata"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert set(weights) == {"weight", "alpha", "bias"}
    assert torch.allclose(weights["weight"].norm(dim=1), torch.ones(32), atol=1e-5)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "reconstruction", "sparsity", "examples_per_s", "step_time_s"):
        assert key in record
    # The resolved config reloads to the same experiment.
    assert load_experiment(str(tmp_path / "config.yaml")) == load_experiment(None, SMALL_RICA)


@pytest.mark.parametrize(
    "experiment, overrides, stop_at",
    [(None, SMALL_RICA, 3), ("digits-sae", SMALL_SAE_ADAM, 8)],
    ids=["rica-lbfgs", "sae-adam-dropout-minibatch"],
)
def test_interrupted_run_resumes_exactly(tmp_path, experiment, overrides, stop_at):
    """A run stopped after `stop_at` steps and resumed equals one never stopped, bit for bit
    (L-BFGS history, Adam moments, dropout RNG and batch order all restored)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    config = load_experiment(experiment, overrides)
    run_experiment(config, whole)
    steps = config.train.steps
    interrupted = load_experiment(experiment, overrides + [f"train.steps={stop_at}"])
    if interrupted.supervised is not None:
        interrupted.supervised = None
    run_experiment(interrupted, parts)
    (parts / "results.json").unlink()  # as if killed before the stage finished
    run_experiment(config, parts)
    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(parts / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(whole) == _losses(parts)
    assert len(_losses(parts)) == steps // config.train.log_every
    if config.supervised is not None:
        a = load_file(str(whole / "supervised/model.safetensors"))
        b = load_file(str(parts / "supervised/model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_result_on_cpu(tmp_path):
    config = load_experiment(None, SMALL_RICA + ["train.steps=2", "train.checkpoint_every=0"])
    run_experiment(config, tmp_path / "a")
    run_experiment(config, tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_stops_with_message_and_keeps_last_good_checkpoint(cli, tmp_path):
    result = cli(
        "train", "digits-sae", "--out", str(tmp_path),
        "--set", "model.activation=identity", "--set", "model.decoder_activation=identity",
        "--set", "objective.kind=reconstruction", "--set", "optimizer.name=sgd",
        "--set", "optimizer.lr=1e6", "--set", "train.steps=50", "--set", "train.checkpoint_every=1",
        "--set", "train.batch_size=32",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loss became" in result.stderr and "last good checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    latest = CheckpointManager(tmp_path / "checkpoints").latest()
    assert latest is not None
    from terabrain.train.checkpoint import template_from_metadata, load
    state = {"model": template_from_metadata(latest, "model.")}
    load(latest, state)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_early_stopping_on_plateau(tmp_path):
    config = load_experiment(
        None, SMALL_RICA + ["train.steps=40", "train.early_stopping.patience=2",
                            "train.early_stopping.min_delta=0.5"]
    )
    results = run_experiment(config, tmp_path)
    assert results["features"]["stop_reason"].startswith("early stopping")
    assert results["features"]["steps"] < 40
    assert (tmp_path / f"checkpoints/step_{results['features']['steps']}").is_dir()


def test_digits_sae_features_classify_digits(tmp_path):
    results = run_experiment(load_experiment("digits-sae", ["train.progress=false"]), tmp_path)
    assert results["supervised"]["test_accuracy"] > 0.93
    assert (tmp_path / "supervised/model.safetensors").is_file()


def test_freed_buffers_are_released_for_large_models_only(tmp_path, monkeypatch):
    """``train.release_freed_buffers``: auto releases freed buffers only where the model's
    floor is a large share of memory and keeps them otherwise; always and never do what they
    say; the results are the same either way (it changes where buffers come from, not what
    is computed)."""
    from terabrain.train import malloc

    gib = 2**30
    assert malloc.releases_freed_buffers("auto", 100 * 2**20, memory=16 * gib)  # 300 MiB of 16 GiB
    assert not malloc.releases_freed_buffers("auto", 50 * 2**20, memory=16 * gib)
    assert malloc.releases_freed_buffers("auto", 10, memory=None) == (
        malloc.physical_memory() is None)
    assert malloc.releases_freed_buffers("always", 10, memory=16 * gib)
    assert not malloc.releases_freed_buffers("never", 1 * gib, memory=16 * gib)

    calls = []
    monkeypatch.setattr(malloc, "map_large_buffers", lambda: calls.append("release") or True)
    monkeypatch.setattr(malloc, "keep_freed_buffers", lambda: calls.append("keep") or True)
    small = SMALL_RICA + ["train.steps=2", "train.checkpoint_every=0"]
    for setting in ("auto", "always", "never"):
        calls.clear()
        run_experiment(load_experiment(None, small + [f"train.release_freed_buffers={setting}"]),
                       tmp_path / setting)
        assert calls == (["release"] if setting == "always" else ["keep"]), setting
    calls.clear()  # each stage allocates by its own setting, in the order the stages train
    run_experiment(load_experiment("digits-sae", [
        "train.progress=false", "train.steps=2", "train.release_freed_buffers=always",
        "supervised.train.steps=2", "supervised.train.release_freed_buffers=never"]),
        tmp_path / "stages")
    assert calls == ["release", "keep"]
    weights = [load_file(str(tmp_path / s / "model.safetensors")) for s in ("auto", "always")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
