"""The k-means learner (model.kind kmeans): Sculley's mini-batch update through the common
training loop, its loss falling, and a 2-rank data-parallel run equal to one process."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from terabrain.learners.kmeans import KMeansObjective, MiniBatchKMeansStep
from terabrain.nn.kmeans import KMeans, squared_distances, triangle

from conftest import torchrun

KMEANS = ["model={kind: kmeans, hidden: 24}", "objective={kind: reconstruction}",
          "data.patch_size=6", "data.num_patches=4000", "data.holdout_patches=500",
          "data.whitening_fit_samples=4000", "train.batch_size=200", "train.steps=20",
          "train.log_every=1", "train.checkpoint_every=0", "train.progress=false"]


def sets(values):
    return [a for value in values for a in ("--set", value)]


def test_one_step_is_sculleys_update_with_per_centroid_rates():
    """Two steps by hand: c_k += (s_k - n_k c_k) / N_k with N_k the cumulative count."""
    torch.manual_seed(0)
    model = KMeans(3, 4, seed=1)
    step = MiniBatchKMeansStep([model.centroids, model.counts])
    objective = KMeansObjective()
    centroids, counts = model.centroids.detach().clone(), torch.zeros(4)
    for batch in (torch.randn(10, 3), torch.randn(10, 3)):
        nearest = squared_distances(batch, centroids).argmin(dim=1)

        def closure(batch=batch):
            step.zero_grad()
            loss, _ = objective(model, batch)
            loss.backward()
            return loss

        step.step(closure)
        for k in range(4):
            members = batch[nearest == k]
            counts[k] += len(members) / len(batch)
            if len(members):
                centroids[k] += (members.sum(0) - len(members) * centroids[k]) / (counts[k] * len(batch))
        torch.testing.assert_close(model.counts.detach(), counts)
        torch.testing.assert_close(model.centroids.detach(), centroids)


def test_triangle_activation_is_mean_distance_minus_distance_clipped():
    x, c = torch.randn(5, 3), torch.randn(4, 3)
    z = torch.cdist(x, c)
    torch.testing.assert_close(triangle(x, c), (z.mean(1, keepdim=True) - z).clamp_min(0),
                               rtol=1e-4, atol=1e-5)
    # With gradients (training) the formula is built out of place; without (extraction) in
    # place: the same values.
    with_grad = triangle(x, c.clone().requires_grad_(True))
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), triangle(x, c))


def test_kmeans_loss_falls_and_filters_are_written(tmp_path):
    """The logged error falls, and on held-out patches the trained centroids reconstruct
    better than the initial ones and than K training patches taken as centroids."""
    import json

    from terabrain.config.loader import load_experiment
    from terabrain.data.prepare import prepare_data
    from terabrain.train.run import run_experiment

    config = load_experiment("natural-patches-rica", KMEANS)
    run = tmp_path / "run"
    run_experiment(config, run)
    losses = [json.loads(line)["reconstruction"]
              for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])
    weights = load_file(str(run / "model.safetensors"))
    assert weights["centroids"].shape == (24, 36) and (run / "filters.png").is_file()
    assert weights["counts"].sum() == pytest.approx(20, rel=1e-5)  # one unit of mass per step

    data = prepare_data(config.data, config.seed)

    def error(centroids):
        return squared_distances(data.holdout_x, centroids).min(dim=1).values.mean()

    sampled = data.train_x[torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))[:24]]
    assert error(weights["centroids"]) < error(sampled)
    assert error(weights["centroids"]) < error(KMeans(36, 24, seed=config.seed).centroids.detach())


def test_two_data_parallel_ranks_give_the_centroids_of_one_process(tmp_path):
    from conftest import run_cli

    run_cli("train", "natural-patches-rica", "--out", str(tmp_path / "one"), *sets(KMEANS),
            check=True)
    result = torchrun(2, "-m", "terabrain", "train", "natural-patches-rica",
                      "--out", str(tmp_path / "two"), *sets(KMEANS + ["parallel.data=2"]))
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    torch.testing.assert_close(two["counts"], one["counts"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two["centroids"], one["centroids"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one["centroids"], KMeans(36, 24, seed=0).centroids)  # it moved


def test_kmeans_refuses_a_model_axis_and_weight_decay(cli):
    result = cli("train", "natural-patches-rica", *sets(KMEANS + ["objective.weight_decay=0.1"]))
    assert result.returncode == 2 and "objective.weight_decay must be 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
