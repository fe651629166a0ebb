"""ZCA whitening fitted on a sample, saved with the run so features can be computed later.

ZCA (rather than PCA) whitening keeps the whitened patch in pixel space, so learned filters
can be drawn as images, and it is the rotation of PCA whitening closest to the identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from terabrain.errors import ConfigError
from terabrain.tensor_files import expect_tensors, load_tensors


class ZCA:
    """``x -> (x - mean) @ matrix``; ``matrix`` is symmetric, so rows or columns alike."""

    def __init__(self, mean: np.ndarray, matrix: np.ndarray, epsilon: float):
        self.mean = mean.astype(np.float32)
        self.matrix = matrix.astype(np.float32)
        self.epsilon = float(epsilon)

    @classmethod
    def fit(cls, sample: np.ndarray, epsilon: float) -> "ZCA":
        """Fit on rows of ``sample``. ``epsilon`` regularises the small eigenvalues (it is a
        fraction of the mean eigenvalue, so it does not depend on the data's scale) and acts
        as a low-pass filter: larger values give smoother filters."""
        data = sample.astype(np.float64)
        mean = data.mean(axis=0)
        centred = data - mean
        covariance = centred.T @ centred / max(len(data) - 1, 1)
        return cls._from_covariance(mean, covariance, epsilon)

    @classmethod
    def from_moments(cls, count: int, total: np.ndarray, outer: np.ndarray, epsilon: float) -> "ZCA":
        """Fit from the count, sum and sum of outer products of the rows (float64): what
        replicas add up to fit one transform on samples that each read from its own shards."""
        mean = total / count
        covariance = (outer - count * np.outer(mean, mean)) / max(count - 1, 1)
        return cls._from_covariance(mean, covariance, epsilon)

    @classmethod
    def _from_covariance(cls, mean: np.ndarray, covariance: np.ndarray, epsilon: float) -> "ZCA":
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        floor = epsilon * eigenvalues.mean()
        scale = 1.0 / np.sqrt(eigenvalues + floor)
        matrix = (eigenvectors * scale) @ eigenvectors.T
        return cls(mean, matrix, epsilon)

    def apply(self, data: np.ndarray) -> np.ndarray:
        return ((data - self.mean) @ self.matrix).astype(np.float32)

    def save(self, path: Path) -> None:
        save_file(
            {
                "mean": torch.from_numpy(self.mean),
                "matrix": torch.from_numpy(self.matrix),
                "epsilon": torch.tensor([self.epsilon], dtype=torch.float64),
            },
            str(path),
        )

    @classmethod
    def load(cls, path: Path) -> "ZCA":
        tensors = load_tensors(path, ConfigError, "the whitening transform")
        expect_tensors(tensors, {"mean": 1, "matrix": 2, "epsilon": 1}, path, ConfigError)
        width = tensors["mean"].shape[0]
        if tuple(tensors["matrix"].shape) != (width, width) or tensors["epsilon"].numel() != 1:
            raise ConfigError(f"{path} is damaged: its matrix is not {width} x {width}")
        return cls(
            tensors["mean"].numpy(), tensors["matrix"].numpy(), float(tensors["epsilon"][0])
        )
