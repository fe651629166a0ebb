"""Mini-batch k-means (Sculley 2010) on whitened patches, the baseline of Coates, Lee & Ng
2011: K centroids, encoded with the triangle activation (terabrain.nn.kmeans).

How it trains inside the common loop, data-parallel like the other learners:

- The objective is the mean squared distance of each row to its nearest centroid (k-means'
  reconstruction error; ``objective.kind: reconstruction``). Its gradient for centroid k is
  ``(n_k c_k - s_k) / B``: the batch's member count and sum of that centroid. A zero-valued
  term gives ``counts`` the gradient ``n_k / B``.
- Data-parallel replicas average these gradients (terabrain.parallel): the all-reduce of
  each centroid's sums and counts, so every replica sees the global batch's statistics.
- ``MiniBatchKMeansStep`` (a torch.optim optimizer) adds ``n_k / B`` to ``counts`` and moves
  ``c_k -= grad / counts``, i.e. ``c_k += (s_k - n_k c_k) / N_k`` with N_k the cumulative
  count: Sculley's per-centre learning rate 1/N_k, exactly, for a constant batch size.
  The ``optimizer`` section is not used.

Hidden units are not split across ranks (parallel.model must be 1): K centroids of a few
dozen values are small.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from terabrain.errors import ConfigError
from terabrain.learners.base import FilterPicture, Learner, ModelSection, Training
from terabrain.nn.kmeans import KMeans
from terabrain.objectives import Objective


class KMeansModel(ModelSection):
    """Mini-batch k-means: K centroids, triangle activation (Coates et al. 2011)."""

    kind: Literal["kmeans"] = Field(
        "kmeans", description="The feature learner (terabrain.learners): rica, autoencoder, "
        "deep, kmeans.")
    hidden: PositiveInt = Field(128, description="Centroids (features, filters): K.")


class KMeansObjective(Objective):
    """Mean squared distance to the nearest centroid, plus a zero-valued term whose gradient
    carries each centroid's share of the batch to ``counts``."""

    logged_names = ("loss", "reconstruction", "empty")

    def __call__(self, model: KMeans, x, y=None):
        nearest, reconstruction = model(x)
        error = 0.5 * (x.float() - reconstruction).pow(2).sum(dim=1).mean()
        share = torch.bincount(nearest, minlength=model.counts.shape[0]).to(x.dtype) / len(x)
        carried = ((model.counts - model.counts.detach()) * share).sum()
        empty = (share == 0).float().mean()
        return error + carried, {"reconstruction": 2 * error.detach(), "empty": empty}


class MiniBatchKMeansStep(torch.optim.Optimizer):
    """Sculley's mini-batch k-means update from the averaged gradients (module docstring).
    Parameters: [centroids, counts]."""

    def __init__(self, params, lr: float = 1.0):
        super().__init__(params, {"lr": lr})  # 1: Sculley's rule; the logs read group["lr"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            centroids, counts = group["params"]
            if counts.grad is None:
                continue
            counts.add_(counts.grad)
            moved = counts > 0
            centroids[moved] -= group["lr"] * centroids.grad[moved] / counts[moved, None]
        return loss


class KMeansLearner(Learner):
    kind, section, objectives = "kmeans", KMeansModel, ("reconstruction",)

    def check(self, config):
        super().check(config)
        if config.objective.weight_decay:
            raise ValueError("objective.weight_decay must be 0 for model.kind kmeans "
                             "(k-means minimises the distance to the nearest centroid only)")
        if config.precision == "bf16-weights":
            raise ValueError("precision bf16-weights is for gradient-trained models; k-means "
                             "updates fp32 centroids (allowed for model.kind kmeans: fp32, bf16)")

    def check_parallel(self, config, parallel):
        if parallel.model_ranks > 1:
            raise ConfigError("parallel.model must be 1 for model.kind kmeans (its centroids "
                              "are replicated; use parallel.data)")

    def build(self, config, example_shape, seed):
        return KMeans(int(torch.Size(example_shape).numel()), config.model.hidden, seed)

    def parallelize(self, config, network, parallel, device):
        return parallel.parallelize(network, device)

    def training(self, config, network, parallel, example_shape):
        return Training(model=network, objective=KMeansObjective(),
                        parameters=[network.centroids, network.counts],
                        optimizer=MiniBatchKMeansStep)

    def picture(self, config, network, weights, example_shape):
        return FilterPicture(network.filters().cpu(), example_shape, comparable=False)

    def feature_width(self, config, network):
        return config.model.hidden

    def capacity(self, config, example_shape):
        from terabrain.capacity.costs import FP32, ring_all_reduce
        from terabrain.capacity.planner import Capacity, RankFigures

        inputs, hidden = int(torch.Size(example_shape).numel()), config.model.hidden
        parameters = hidden * (inputs + 1)

        def per_rank(data_ranks: int, model_ranks: int, rows: int) -> RankFigures:
            reasons = ["model.kind kmeans keeps its centroids whole (parallel.model 1)"] \
                if model_ranks > 1 else []
            return RankFigures(
                reasons=reasons, local_parameters=parameters, weights=FP32 * parameters,
                gradients=FP32 * parameters, optimizer=0,
                # the rows, their distances to every centroid and the nearest centroids
                activations=FP32 * rows * (2 * inputs + hidden),
                model_axis_sent=0,
                data_axis_sent=round(ring_all_reduce(data_ranks, FP32 * (parameters + 3))),
            )

        return Capacity(
            description=f"k-means {inputs:,} -> {hidden:,} centroids", parameters=parameters,
            hidden=hidden, per_rank=per_rank,
            notes=["k-means: one all-reduce of the centroids' sums and counts per step"])

    def describe(self, config):
        return f"k-means with {config.model.hidden} centroids (triangle activation)"
