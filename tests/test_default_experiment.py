"""The demo: `terabrain train` with no arguments learns edge detectors from photographs.

"Edge detector" is checked with two numbers, against random unit-norm filters of the same
shape: learned filters concentrate their energy in a small region (localized), and their
responses on held-out whitened patches are sparse (high kurtosis).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from terabrain.analysis.filters import response_kurtosis, spatial_spread
from terabrain.data.whitening import ZCA


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    from conftest import run_cli

    run_dir = tmp_path_factory.mktemp("demo")
    result = run_cli("train", "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir, result.stdout


def test_demo_writes_filters_picture_and_summary(default_run):
    run_dir, stdout = default_run
    image = Image.open(run_dir / "filters.png")
    assert image.mode == "RGB" and min(image.size) >= 128
    assert "filters: spatial spread" in stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["features"]["stop_reason"] == "finished"


def test_learned_filters_are_localized_and_sparse_compared_with_random(default_run):
    run_dir, _ = default_run
    filters = load_file(str(run_dir / "model.safetensors"))["weight"]
    random = torch.randn(filters.shape, generator=torch.Generator().manual_seed(123))
    random /= random.norm(dim=1, keepdim=True)
    learned_spread = np.median(spatial_spread(filters, (8, 8)))
    random_spread = np.median(spatial_spread(random, (8, 8)))
    assert learned_spread < 0.75 * random_spread

    # Held-out natural patches, prepared with the run's own saved whitening.
    from terabrain.data.embedded import load_photo
    from terabrain.data.patches import remove_patch_mean, sample_patches

    rng = np.random.default_rng(999)
    patches = remove_patch_mean(sample_patches([load_photo("camera"), load_photo("coffee")], 8, 5000, rng))
    whitened = torch.from_numpy(ZCA.load(run_dir / "whitening.safetensors").apply(patches))
    learned_kurtosis = np.median(response_kurtosis(filters, whitened))
    random_kurtosis = np.median(response_kurtosis(random, whitened))
    assert learned_kurtosis > 1.5 * random_kurtosis


def test_resume_of_a_finished_run_changes_nothing(default_run, cli):
    run_dir, _ = default_run
    before = load_file(str(run_dir / "model.safetensors"))
    result = cli("train", "--resume", str(run_dir), check=True)
    # The run directory records every stage as done: nothing is trained or rewritten.
    assert "finished; nothing to do" in result.stdout
    after = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
