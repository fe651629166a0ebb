"""Single-layer feature learners: RICA and the (sparse) autoencoder, plus a supervised head.

Models are plain modules: no parallelism, no loss. Each exposes ``encode`` (the features)
and ``filters()`` (one row per hidden unit, in input space, for pictures).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from terabrain.config.schema import ModelConfig

_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda x: x,
}


class RICA(nn.Module):
    """Reconstruction ICA with scale and offset (seed 000, eq. 1):
    codes ``h = alpha W x``, reconstruction ``W^T h + b``, rows of ``W`` of unit norm.

    The forward pass uses ``W`` with each row divided by its norm. The stored rows are kept
    at unit norm after every step (``normalize_``), so this changes no value, but it makes
    the gradient the projection onto the constraint's tangent space: line searches
    (L-BFGS) and momentum then move along the constraint instead of fighting it.
    """

    def __init__(self, inputs: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, inputs))
        self.alpha = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(inputs))
        self.dropout = nn.Dropout(dropout)
        self.normalize_()

    def unit_weight(self) -> torch.Tensor:
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * F.linear(self.dropout(x), self.unit_weight())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.unit_weight()
        codes = self.alpha * F.linear(self.dropout(x), w)
        return codes, codes @ w + self.bias

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def filters(self) -> torch.Tensor:
        return self.unit_weight().detach()


class Autoencoder(nn.Module):
    """``h = act(W1 x + b1)``, ``x' = out(W2 h + b2)`` with ``W2 = W1^T`` when tied."""

    def __init__(
        self,
        inputs: int,
        hidden: int,
        tied: bool = True,
        activation: str = "sigmoid",
        decoder_activation: str = "identity",
        dropout: float = 0.0,
    ):
        super().__init__()
        bound = math.sqrt(6.0 / (inputs + hidden + 1))  # Glorot, as in the UFLDL SAE
        self.encoder = nn.Linear(inputs, hidden)
        nn.init.uniform_(self.encoder.weight, -bound, bound)
        nn.init.zeros_(self.encoder.bias)
        self.tied = tied
        if tied:
            self.decoder_bias = nn.Parameter(torch.zeros(inputs))
        else:
            self.decoder = nn.Linear(hidden, inputs)
            nn.init.uniform_(self.decoder.weight, -bound, bound)
            nn.init.zeros_(self.decoder.bias)
        self.activation = _ACTIVATIONS[activation]
        self.decoder_activation = _ACTIVATIONS[decoder_activation]
        self.dropout = nn.Dropout(dropout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.encoder(self.dropout(x)))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        if self.tied:
            out = h @ self.encoder.weight + self.decoder_bias
        else:
            out = self.decoder(h)
        return self.decoder_activation(out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return codes, self.decode(codes)

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices (not biases): what weight decay applies to."""
        return [self.encoder.weight] + ([] if self.tied else [self.decoder.weight])

    def filters(self) -> torch.Tensor:
        return self.encoder.weight.detach()


class SupervisedHead(nn.Module):
    """A linear classifier or regressor on the features of a trained feature learner."""

    def __init__(self, features: nn.Module, hidden: int, outputs: int, dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features.encode(x)))


def build_model(config: ModelConfig, inputs: int) -> nn.Module:
    if config.kind == "rica":
        return RICA(inputs, config.hidden, config.dropout)
    return Autoencoder(
        inputs,
        config.hidden,
        tied=config.tied,
        activation=config.activation,
        decoder_activation=config.decoder_activation,
        dropout=config.dropout,
    )
