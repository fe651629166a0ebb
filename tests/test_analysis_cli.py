"""`terabrain analyze`, `features` and `probe` on a tiny run trained inside the test, and the
parallel top-k / features pass on 2 gloo ranks against one process."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from terabrain.data.labelled import fashion_mnist_available

from conftest import SCRIPTS, torchrun

TINY = ["data.num_patches=1500", "data.holdout_patches=300", "data.whitening_fit_samples=1500",
        "model.hidden=16", "train.steps=3", "optimizer.max_iter=10", "train.checkpoint_every=0",
        "train.progress=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small natural-patches RICA run, trained in this process (a subprocess per command
    would spend most of its time importing torch)."""
    from terabrain.config.loader import load_experiment
    from terabrain.train.run import run_experiment

    run_dir = tmp_path_factory.mktemp("analysis") / "run"
    run_experiment(load_experiment("natural-patches-rica", TINY), run_dir)
    return run_dir


def terabrain(capsys, *args: str) -> tuple[int, str, str]:
    """`terabrain ARGS` in this process: (exit code, stdout, stderr)."""
    from terabrain.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_writes_a_report_with_every_section(tiny_run, capsys):
    concepts = "faces,fashion-mnist" if fashion_mnist_available() else "faces"
    code, stdout, _ = terabrain(capsys, "analyze", str(tiny_run), "--concepts", concepts,
                                "--random-networks", "2", "--max-examples", "400",
                                "--neurons", "4", "--top-k", "3", "--data", "faces",
                                "--maximize-steps", "40")
    out = tiny_run / "analysis"
    assert code == 0 and "faces" in stdout and "report.html" in stdout
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    # The command as given to the CLI, quoted so that the report can be made again.
    assert f"terabrain analyze {tiny_run} --concepts {concepts} --random-networks 2" in markdown
    for title in ("First-layer filters", "Reconstructions", "Learning curves",
                  "Top-3 stimuli of the 4 most selective layer-1 neurons", "Concept neurons"):
        assert title in html and title in markdown
    pictures = ("filters.png", "reconstructions.png", "learning_curves.png", "top_stimuli.png",
                "concept_neurons.png")
    for name in pictures:
        assert f'src="{name}"' in html and f"]({name})" in markdown
        with Image.open(out / name) as image:
            assert image.size[0] > 100 and image.size[1] > 50
    summary = json.loads((out / "analysis.json").read_text())
    rows = {row["concept"]: row for row in summary["concepts"]}
    assert set(rows) >= {"faces"} and (len(rows) == 11) == fashion_mnist_available()
    for row in rows.values():
        for key in ("guessing", "best_pixel", "linear_filter", "random_network", "learned"):
            assert 0.0 <= row[key] <= 1.0
        assert f"| {row['concept']} |" in markdown
    assert abs(rows["faces"]["positives"] - 0.35) < 0.01
    assert rows["faces"]["selection_examples"] == rows["faces"]["heldout_examples"] == 143
    assert "<table>" in html and html.count("<tr>") >= 1 + len(rows)
    for neuron in summary["neurons"]:  # at equal norm, the optimum beats the best real input
        assert neuron["optimal_final"] >= neuron["top_values"][0] - 1e-3
        assert neuron["optimal_final"] > neuron["optimal_start"]

    # The default data set: the run's own held-out patches, rebuilt from its config.
    code, _, _ = terabrain(capsys, "analyze", str(tiny_run), "--concepts", "none",
                           "--neurons", "2", "--maximize-steps", "20")
    summary = json.loads((out / "analysis.json").read_text())
    assert code == 0 and summary["data"] == "holdout" and summary["examples"] == 300
    assert "Concept neurons" not in (out / "report.md").read_text()


def test_features_and_probe_commands(tiny_run, tmp_path, capsys):
    from terabrain.analysis.activations import batched_activations
    from terabrain.analysis.datasets import load_analysis_data
    from terabrain.analysis.features import model_rows
    from terabrain.analysis.loaded_run import load_run

    out = tmp_path / "digits.npy"
    code, stdout, _ = terabrain(capsys, "features", str(tiny_run), "--data", "digits",
                                "--split", "test", "--out", str(out))
    assert code == 0 and "450 x 16" in stdout
    features, labels = np.load(out), np.load(tmp_path / "digits.labels.npy")
    run = load_run(tiny_run)
    data = load_analysis_data("digits", run)
    expected = batched_activations(run.model, model_rows(run, data, "test")).numpy()
    assert features.shape == (450, 16) and labels.shape == (450,)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert (labels == data.test.labels).all()

    code, stdout, _ = terabrain(capsys, "probe", str(tiny_run), "--data", "digits",
                                "--max-examples", "300", "--out", str(tmp_path / "p.json"))
    assert code == 0
    probe = json.loads((tmp_path / "p.json").read_text())["results"]
    assert set(probe) == {"learned network", "random network",
                          "model input (pixels as the network sees them)", "raw pixels (native size)"}
    assert probe["raw pixels (native size)"]["test_accuracy"] > 0.85  # digits are easy for pixels
    assert all(0.1 < r["test_accuracy"] <= 1.0 for r in probe.values())
    assert "learned network" in stdout


def test_analysis_commands_report_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    code, _, stderr = terabrain(capsys, "analyze", str(tmp_path))
    assert code == 2 and "not a finished run directory" in stderr
    code, _, stderr = terabrain(capsys, "analyze", str(tiny_run), "--layer", "2", "--concepts", "none")
    assert code == 2 and "has 1 layer(s)" in stderr
    code, _, stderr = terabrain(capsys, "analyze", str(tiny_run), "--concepts", "cats")
    assert code == 2 and "allowed: faces,fashion-mnist" in stderr
    code, _, stderr = terabrain(capsys, "probe", str(tiny_run), "--data", "holdout")
    assert code == 2 and "no labels" in stderr


def test_two_ranks_give_the_top_k_and_features_of_one_process(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    from analysis_ranks import fixture

    from terabrain.analysis.topk import neuron_stats

    result = torchrun(2, str(SCRIPTS / "analysis_ranks.py"), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    model, x = fixture()
    single = neuron_stats(model, x, k=5, batch_size=64)
    ranks = torch.load(tmp_path / "stats.pt")
    assert torch.equal(ranks["indices"], single.top_indices)
    assert torch.allclose(ranks["values"], single.top_values, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ranks["mean"], single.mean(), atol=1e-7)
    assert torch.allclose(ranks["std"], single.std(), atol=1e-6)
    assert ranks["count"] == len(x)
    with torch.no_grad():
        expected = model.encode(x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "features.npy"), expected, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "features.npy.partial").exists()
