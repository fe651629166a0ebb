"""k-means as a feature learner (Coates, Lee & Ng 2011): K centroids in input space, the
"triangle" encoding ``f_k(x) = max(0, mean_j z_j - z_k)`` with ``z_k = ||x - c_k||``, and
the squared distance to the nearest centroid as its reconstruction error.

``counts`` is each centroid's cumulative assigned mass (assignments per batch row, summed
over steps): mini-batch k-means (Sculley 2010) moves a centroid by ``1 / counts`` of the way
to the mean of its new members. It is a parameter, not a buffer, so the batch's counts reach
it the way every other learner's statistics travel: as a gradient, averaged across
data-parallel replicas together with the centroids' gradient (terabrain.learners.kmeans).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from terabrain.nn.autoencoder import UnitInitialized, _draw_seed
from terabrain.nn.init import init_by_unit_

INIT_SCALE = 0.1  # Coates et al.'s initial centroids: N(0, 0.1^2) in whitened space


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(rows, K) squared Euclidean distances, by ||x||^2 - 2 x.c + ||c||^2 (one GEMM)."""
    return (x.pow(2).sum(dim=1, keepdim=True) - 2 * x @ centroids.T
            + centroids.pow(2).sum(dim=1)).clamp_min(0.0)


def triangle(x: torch.Tensor, centroids: torch.Tensor,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Coates et al. 2011's triangle activation: ``max(0, mean_k z_k - z_k)``. Without
    gradients, ``out`` (a float32 (rows, K) tensor) receives the result: a buffer reused
    across batches."""
    if torch.is_grad_enabled() and (x.requires_grad or centroids.requires_grad):
        z = squared_distances(x, centroids).sqrt()
        return (z.mean(dim=1, keepdim=True) - z).clamp_min(0.0)
    # Feature extraction (rows = every patch position of many images): the same formula
    # on one (rows, K) buffer, each step in place, so it is written once and read ~6 times
    # instead of allocating a new buffer per step. In float32 even under bfloat16 autocast:
    # the cost is these element-wise steps, not the product, and bfloat16 element-wise ops
    # on CPU convert to float32 and back at each step (measured 1.4x slower).
    with torch.autocast(x.device.type, enabled=False):
        x, centroids = x.float(), centroids.float()
        z = torch.addmm(centroids.pow(2).sum(dim=1), x, centroids.T, alpha=-2.0, out=out)
        z.add_(x.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0.0).sqrt_()
        return torch.sub(z.mean(dim=1, keepdim=True), z, out=z).clamp_min_(0.0)


class KMeans(UnitInitialized):
    hidden_unit_dims = {"centroids": 0, "counts": 0}

    def __init__(self, inputs: int, hidden: int, seed: Optional[int] = None):
        super().__init__()
        self.init_seed = _draw_seed(seed)
        self.centroids = nn.Parameter(torch.empty(hidden, inputs))
        self.counts = nn.Parameter(torch.empty(hidden))
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        if name == "centroids":
            init_by_unit_(tensor, 0, first_unit, self.init_seed, 0, "normal", INIT_SCALE)
        else:
            tensor.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return triangle(x, self.centroids)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest centroid's index per row, that centroid: the reconstruction)."""
        with torch.no_grad():
            nearest = squared_distances(x, self.centroids).argmin(dim=1)
        return nearest, self.centroids[nearest]

    def filters(self) -> torch.Tensor:
        return self.centroids.detach()
