"""The small classifier of the built-in `fashion-cnn-sae`: two 5x5 convolutions with max
pooling, a fully connected ReLU layer (``penultimate``, whose activations the sparse
autoencoder learns) and a linear classifier. Plain PyTorch, nothing terabrain-specific, so
it is also the example of a user's network named by an import path
(``terabrain.nn.fashion_cnn:fashion_cnn``)."""

from __future__ import annotations

import torch
from torch import nn


class FashionCNN(nn.Module):
    """(N, 1, 28, 28) images -> (N, classes) logits. ``penultimate`` is the
    (N, width) ReLU layer before the classifier."""

    def __init__(self, width: int = 64, classes: int = 10, channels: tuple[int, int] = (8, 16)):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(second * 7 * 7, width), nn.ReLU())
        self.classifier = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.penultimate(self.features(images)))


def fashion_cnn() -> FashionCNN:
    """The built-in's network (initialised from torch's current seed)."""
    return FashionCNN()
