"""A sparse dictionary of a network's layer (the ``source_network`` section and the
built-in fashion-cnn-sae): the layer tap and splice, the report's numbers on networks whose
answers are known, the one-line errors, and the built-in's stages end to end."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from terabrain.analysis.splice import (
    class_selectivity,
    downstream,
    reconstruction_quality,
)
from terabrain.cli import main
from terabrain.data.labelled import fashion_mnist_available, load_fashion_mnist
from terabrain.errors import ConfigError
from terabrain.nn.fashion_cnn import FashionCNN
from terabrain.source_network import (
    LayerTap,
    layer_activations,
    load_network,
    network_outputs,
)

BIAS = torch.tensor([0.0, 0.25])


def two_class_network() -> nn.Module:
    """logits = layer(x) + BIAS, with the layer the identity: a network whose outputs under
    any replacement of the layer are known."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.copy_(BIAS)
    return nn.Sequential(OrderedDict(layer=nn.Identity(), head=head))


def two_class_data(rows: int = 400):
    x = torch.randn(rows, 2, generator=torch.Generator().manual_seed(0))
    return x, (x + BIAS).argmax(dim=1)  # labelled by the network itself: accuracy 1


def test_downstream_scores_known_replacements():
    network, (x, labels) = two_class_network(), two_class_data()
    tap = LayerTap(network, "layer")
    train_mean = torch.tensor([0.5, -1.0])

    def outputs(replace):
        return network_outputs(tap, x, (2,), "rows", 64, replace)

    report = downstream(outputs, labels, train_mean, lambda layer: layer.clone())
    accuracy, loss = report["accuracy"], report["loss"]
    assert accuracy["original"] == accuracy["spliced"] == 1.0
    assert loss["spliced"] == pytest.approx(loss["original"], abs=1e-7)
    assert report["loss_increase"] == pytest.approx(0.0, abs=1e-7)
    assert report["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    # Zeroed, the logits are the bias: class 1 for every example.
    assert accuracy["zero_ablation"] == pytest.approx(float((labels == 1).float().mean()))
    assert loss["zero_ablation"] == pytest.approx(
        float(F.cross_entropy(BIAS.expand(len(x), 2), labels)), rel=1e-6)
    # The training mean: logits mean + bias = (0.5, -0.75), class 0 for every example.
    assert accuracy["mean_ablation"] == pytest.approx(float((labels == 0).float().mean()))
    # A reconstruction that flips the layer's sign: the network's own verdict on -x.
    flipped = downstream(outputs, labels, train_mean, lambda layer: -layer)
    expected = float(((-x + BIAS).argmax(dim=1) == labels).float().mean())
    assert flipped["accuracy"]["spliced"] == pytest.approx(expected)
    assert flipped["accuracy"]["spliced"] < 0.5 and flipped["loss_increase"] > 0


def test_tap_takes_the_layer_and_splices_it_back():
    torch.manual_seed(0)
    network = FashionCNN().eval()
    images = torch.rand(37, 28 * 28)
    tap = LayerTap(network, "penultimate")
    with torch.no_grad():
        direct = network.penultimate(network.features(images.reshape(-1, 1, 28, 28)))
        assert torch.equal(layer_activations(tap, images, (28, 28), "images", 37), direct)
        # In batches of 10 the convolution sums in another order: equal to rounding.
        batched = layer_activations(tap, images, (28, 28), "images", 10)
        assert torch.allclose(batched, direct, rtol=1e-5, atol=1e-6)
        unchanged = network_outputs(tap, images, (28, 28), "images", 37, lambda a: a.clone())
        assert torch.equal(unchanged, network(images.reshape(-1, 1, 28, 28)))
        zeroed = network_outputs(tap, images, (28, 28), "images", 10, torch.zeros_like)
        assert torch.allclose(zeroed, network.classifier.bias.expand(37, 10))
    assert not network.penultimate._forward_hooks  # every hook removed


def test_reconstruction_quality_counts():
    activations = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    codes = torch.zeros(500, 6)
    codes[:, 0], codes[::2, 3] = 1.0, 2.0
    perfect = reconstruction_quality(activations, activations.clone(), codes)
    assert perfect["fvu"] == 0.0 and perfect["dead_latents"] == 4
    assert perfect["l0"] == pytest.approx(1.5)
    mean = reconstruction_quality(activations, activations.mean(0).expand_as(activations), codes)
    assert mean["fvu"] == pytest.approx(1.0, abs=1e-6)


def test_class_selectivity_finds_a_class_latent():
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (900,), generator=generator)
    layer = torch.randn(900, 5, generator=generator)  # says nothing about the classes
    codes = torch.rand(900, 4, generator=generator)
    codes[:, 2] = (labels == 1).float() * 3.0  # latent 2 fires for class 1 only
    rows = class_selectivity(codes, layer, labels, ["a", "b", "c"], seed=0)
    assert rows[1]["sae_latent"] == 1.0 and rows[1]["sae_latent_index"] == 2
    assert rows[1]["layer_neuron"] < 0.9 and rows[1]["random_directions"] < 0.9
    assert rows[1]["guessing"] == pytest.approx(1 - rows[1]["positives"])


def test_torchscript_sequential_is_tapped_without_hooks(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    path = tmp_path / "net.pt"
    torch.jit.script(plain).save(str(path))
    network = load_network(str(path))
    x = torch.randn(11, 6)
    tap = LayerTap(network, "1")
    with torch.no_grad():
        assert torch.allclose(layer_activations(tap, x, (6,), "rows", 4), plain[1](plain[0](x)))
        assert torch.allclose(network_outputs(tap, x, (6,), "rows", 4, torch.zeros_like),
                              plain[2].bias.expand(11, 3))


def test_torchscript_that_is_not_a_sequential_is_refused(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x) * 2

    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    with pytest.raises(ConfigError, match="source_network.layer"):
        LayerTap(load_network(str(path)), "inner")


def test_weights_are_loaded_and_checked(tmp_path):
    torch.manual_seed(3)
    trained = FashionCNN()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = load_network("terabrain.nn.fashion_cnn:fashion_cnn", path, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 trained.state_dict().values()))
    save_file({"other": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="source_network.weights"):
        load_network("terabrain.nn.fashion_cnn:fashion_cnn", tmp_path / "bad.safetensors")


def _one_line(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in "\n".join(err), err
    return err[0]


@pytest.fixture(scope="module")
def small_fashion_files(tmp_path_factory):
    if not fashion_mnist_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    directory = tmp_path_factory.mktemp("fashion")
    images, labels = load_fashion_mnist("train")
    np.save(directory / "images.npy", images[:1200])
    np.save(directory / "labels.npy", labels[:1200])
    return directory


@pytest.fixture()
def small_fashion(small_fashion_files, tmp_path):
    """1,200 Fashion-MNIST training images and labels as .npy (a subset for fast runs), also
    in ``tmp_path``: [the data setting for --set]."""
    for name in ("images.npy", "labels.npy"):
        (tmp_path / name).write_bytes((small_fashion_files / name).read_bytes())
    return [(f"data={{source: npy, path: {tmp_path / 'images.npy'}, labels_path: "
             f"{tmp_path / 'labels.npy'}, test_fraction: 0.25, remove_mean: false, "
             "whitening: none}")]


@pytest.mark.parametrize("setting, field", [
    ("source_network.layer=nope", "source_network.layer"),
    ("source_network.model=no_such_module_xyz:build", "source_network.model"),
    ("source_network.model=terabrain.nn.fashion_cnn:missing", "source_network.model"),
    ("source_network.model=/nonexistent/net.pt", "source_network.model"),
    ("source_network.weights=/nonexistent/w.safetensors", "source_network.weights"),
])
def test_wrong_source_network_is_one_line(tmp_path, capsys, small_fashion, setting, field):
    line = _one_line(capsys, "train", "fashion-cnn-sae", "--out", str(tmp_path / "run"),
                     "--set", small_fashion[0], "--set", setting)
    assert field in line


def _short_run(tmp_path, name, data_setting, capsys, network_steps, steps, hidden):
    run = tmp_path / name
    code = main(["train", "fashion-cnn-sae", "--out", str(run), "--set", data_setting,
                 "--set", f"source_network.training.train.steps={network_steps}",
                 "--set", "source_network.training.train.checkpoint_every=0",
                 "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=0",
                 "--set", "model.init_rows=900", "--set", f"model.hidden={hidden}",
                 "--set", "source_network.batch_size=300"])
    out = capsys.readouterr().out
    assert code == 0, out
    return run, json.loads((run / "results.json").read_text()), out


@pytest.mark.slow  # about 3 minutes on 2 busy cores
def test_builtin_on_a_subset_splices_near_the_original(tmp_path, capsys, small_fashion):
    """fashion-cnn-sae on 900 training images: the CNN learns, and its accuracy with the
    dictionary's reconstruction spliced in keeps at least 90% of what the layer gives over
    zeroing it; zeroing and mean-ablating the layer leave about chance."""
    _, results, out = _short_run(tmp_path, "a", small_fashion[0], capsys, 150, 300, 64)
    splice = results["splice"]
    accuracy = splice["accuracy"]
    assert results["network"]["test_accuracy"] == accuracy["original"] > 0.6
    layer_worth = accuracy["original"] - accuracy["zero_ablation"]
    assert accuracy["original"] - accuracy["spliced"] < 0.1 * layer_worth
    assert accuracy["zero_ablation"] < 0.2 and accuracy["mean_ablation"] < 0.2
    assert splice["loss_recovered"] > 0.9
    assert splice["reconstruction"]["fvu"] < 0.1
    assert len(splice["class_selectivity"]) == 10
    assert "spliced: test accuracy" in out and "class-selective" in out


def test_the_stages_repeat_bit_for_bit_and_analyze(tmp_path, capsys, small_fashion):
    """Two runs of the same config: the same CNN, dictionary and report, bit for bit
    (the CNN's stage is seeded and its batches are a function of (seed, step)); then
    `terabrain analyze` of the first (check_analysis)."""
    run, results, _ = _short_run(tmp_path, "a", small_fashion[0], capsys, 8, 10, 32)
    again, repeated, _ = _short_run(tmp_path, "b", small_fashion[0], capsys, 8, 10, 32)
    assert results["network"]["steps"] == 8 and results["features"]["steps"] == 10
    for name in ("network/model.safetensors", "model.safetensors"):
        assert (run / name).read_bytes() == (again / name).read_bytes(), name
    for stage in ("network", "splice", "activations"):
        drop = {"seconds", "seconds_this_session", "final"}
        assert ({k: v for k, v in results[stage].items() if k not in drop}
                == {k: v for k, v in repeated[stage].items() if k not in drop}), stage
    # Logged on every logged step of the dictionary; the last one is the final report's.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    downstream = [r for r in logged if r["stage"] == "features" and "downstream_accuracy" in r]
    assert [r["step"] for r in downstream] == [r["step"] for r in logged
                                               if r["stage"] == "features"]
    final = downstream[-1]
    assert final["downstream_accuracy"] == pytest.approx(
        results["splice"]["accuracy"]["spliced"], abs=1e-6)
    assert final["downstream_loss_increase"] == pytest.approx(
        results["splice"]["loss_increase"], abs=1e-5)
    assert final["downstream_accuracy_zero"] == results["splice"]["accuracy"]["zero_ablation"]
    check_analysis(run, capsys)


def test_cache_writes_the_hooked_activations_as_shards(tmp_path, capsys, small_fashion):
    """source_network.cache: the layer's activations of the training and held-out rows as
    .npy shards (what data.source activations reads), equal to the network's own."""
    from terabrain.data.activation_shards import ActivationShards

    cache = tmp_path / "cache"
    code = main(["train", "fashion-cnn-sae", "--out", str(tmp_path / "run"), "--set",
                 small_fashion[0], "--set", "source_network.training=null", "--set",
                 f"source_network.cache={cache}", "--set", "train.steps=2", "--set",
                 "model.init_rows=100", "--set", "model.hidden=32"])
    assert code == 0, capsys.readouterr().err
    shards = [ActivationShards(cache / split) for split in ("train", "holdout")]
    cached = np.concatenate([s.rows(0, len(s)) for s in shards])
    network = load_network("terabrain.nn.fashion_cnn:fashion_cnn", seed=0)
    images = torch.from_numpy(np.load(tmp_path / "images.npy")).reshape(1200, -1)
    direct = layer_activations(LayerTap(network, "penultimate"), images, (28, 28), "images",
                               500).numpy()
    assert [len(s) for s in shards] == [900, 300] and cached.shape == direct.shape

    def in_order(rows):
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_array_equal(in_order(cached), in_order(direct))


def check_analysis(run, capsys):
    """`terabrain analyze` on a dictionary of the CNN's layer: per latent its density, its
    top-activating held-out examples (images) and the class it answers most, and the
    concept table with one row per class; the figures are recomputable from the run."""
    from terabrain.analysis.loaded_run import load_run
    from terabrain.data.prepare import prepare_data

    assert main(["analyze", str(run), "--random-networks", "1", "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((run / "analysis" / "analysis.json").read_text())
    for name in ("report.html", "report.md", "density.png", "top_latents.png",
                 "concept_latents.png"):
        assert (run / "analysis" / name).is_file(), name
    assert len(summary["concepts"]) == 10 and printed.count("learned") == 10
    latents = summary["latents"]
    assert [row["latent"] for row in latents] == list(range(32))
    # Recompute from the run: the held-out images through the CNN's layer and the dictionary.
    loaded = load_run(run)
    prepared = prepare_data(loaded.config.data, loaded.config.seed)
    with torch.no_grad():
        codes = loaded.model.encode(loaded.from_prepared(prepared.holdout_x))
    labels = prepared.holdout_y
    for row in latents:
        j = row["latent"]
        assert row["density"] == pytest.approx(float((codes[:, j] > 0).double().mean()))
        if row["density"] > 0:
            means = [float(codes[labels == c, j].double().mean()) for c in range(10)]
            assert row["class"] == str(int(np.argmax(means)))  # npy data: classes by number
            assert row["top_values"][0] == pytest.approx(float(codes[:, j].max()), rel=1e-6)
            assert float(codes[row["top_indices"][0], j]) == pytest.approx(row["top_values"][0])
            assert max(means) / sum(means) == pytest.approx(row["class_share"], rel=1e-6)
    assert summary["dead_latents"] == sum(row["density"] == 0 for row in latents)


def test_streamed_batches_pass_through_the_hook(tmp_path, capsys, small_fashion):
    """data.stream true: each batch goes through the network's layer as the trainer asks
    for it; the dictionary trains on activations (its b_dec is fitted on the held-out
    activations) and no activation is written."""
    from terabrain.train.network_stage import TappedBatches

    class Batches:  # a BatchSource of fixed rows
        batch_size = 4

        def __init__(self, rows):
            self.rows = rows

        def batch(self, step):
            return self.rows[step * 4 : step * 4 + 4], None

    torch.manual_seed(0)
    network = FashionCNN().eval()
    rows = torch.rand(8, 784)
    tapped = TappedBatches(Batches(rows), LayerTap(network, "penultimate"), (28, 28), "images")
    with torch.no_grad():
        expected = network.penultimate(network.features(rows[4:].reshape(4, 1, 28, 28)))
    assert torch.equal(tapped.batch(1)[0], expected) and tapped.batch_size == 4

    images = tmp_path / "images.npy"
    run = tmp_path / "run"
    code = main(["train", "fashion-cnn-sae", "--out", str(run), "--set",
                 (f"data={{source: npy, path: {images}, stream: true, remove_mean: false, "
                 "whitening: none, holdout_patches: 200, workers: 0}"),
                 "--set", "source_network.training=null", "--set", "train.steps=6",
                 "--set", "train.batch_size=100", "--set", "model.init_rows=200",
                 "--set", "model.hidden=32"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["activations"]["streamed"] and results["activations"]["width"] == 64
    assert results["features"]["steps"] == 6 and results["data"]["example_shape"] == [64]
    assert results["splice"] == {"skipped": "the held-out examples have no labels"}


def _wait_for_checkpoint(directory, process, timeout_s=300):
    import time

    deadline = time.monotonic() + timeout_s
    while not any((p / ".metadata").is_file() for p in directory.glob("step_*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no checkpoint in {directory}"
        time.sleep(0.05)


@pytest.mark.slow  # about 2 minutes on 2 busy cores
def test_killed_in_either_stage_resumes_to_the_same_run(tmp_path, small_fashion):
    """SIGKILL once the CNN's stage has a checkpoint, resume; SIGKILL again once the
    dictionary's stage has one, resume: the CNN, the dictionary and the report equal an
    uninterrupted run's, bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sets = [small_fashion[0], "source_network.training.train.steps=40",
            "source_network.training.train.checkpoint_every=5", "train.steps=60",
            "train.checkpoint_every=5", "model.init_rows=900", "model.hidden=64",
            "train.progress=false", "source_network.training.train.progress=false"]

    def command(run):
        return [sys.executable, "-m", "terabrain", "train", "fashion-cnn-sae",
                *[a for s in sets for a in ("--set", s)], "--out", str(run),
                "--resume-if-exists"]

    environment = {**os.environ, "PYTHONPATH": str(repo)}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(reference), env=environment, check=True, capture_output=True)
    for stage_checkpoints in (killed / "network" / "checkpoints", killed / "checkpoints"):
        process = subprocess.Popen(command(killed), env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        _wait_for_checkpoint(stage_checkpoints, process)
        process.kill()
        process.communicate()
    subprocess.run(command(killed), env=environment, check=True, capture_output=True)
    for name in ("network/model.safetensors", "model.safetensors"):
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    expected = json.loads((reference / "results.json").read_text())["splice"]
    got = json.loads((killed / "results.json").read_text())["splice"]
    expected.pop("seconds"), got.pop("seconds")
    assert got == expected
