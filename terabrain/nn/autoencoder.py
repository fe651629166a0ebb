"""Single-layer feature learners: RICA and the (sparse) autoencoder, plus a supervised head.

Models are plain modules: no parallelism, no loss. Each exposes ``encode`` (the features),
``filters()`` (one row per hidden unit, in input space, for pictures), and for the
initialisation by hidden unit (terabrain.nn.init): ``hidden_unit_dims`` (the dimension of
each parameter that indexes hidden units) and ``init_parameter_`` (fill one parameter, or
the slice of it holding units ``first_unit, ...``). A parallel plan shards exactly those
dimensions and initialises each shard in place.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from terabrain.nn.init import init_by_unit_
from terabrain.nn.shared_weight import tied_pair, unit_row_pair
from terabrain.nn.unit_rows import EPS, normalize_rows_, unit_rows


def _draw_seed(seed: Optional[int]) -> int:
    """An explicit seed, or one drawn from torch's global RNG (so torch.manual_seed works)."""
    return int(torch.randint(0, 2**62, (), device="cpu")) if seed is None else seed


class UnitInitialized(nn.Module):
    """Shared by the models: parameters initialised unit by unit from one seed."""

    hidden_unit_dims: dict[str, int] = {}
    init_seed: int = 0

    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, parameter in self.named_parameters():
            if parameter.device.type != "meta":
                self.init_parameter_(name, parameter.data, 0)

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# Named functions, not lambdas: Hogwild workers receive the model by pickling.
_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": _identity,
}


class RICA(UnitInitialized):
    """Reconstruction ICA with scale and offset (Ni et al. 2015, eq. 1):
    codes ``h = alpha W x``, reconstruction ``W^T h + b``, rows of ``W`` of unit norm;
    ``alpha`` learned, or held at ``min(1, inputs / hidden)`` (``learn_scale`` False).

    The forward pass uses ``W`` with each row divided by its norm. The stored rows are kept
    at unit norm after every step (``normalize_``), so this changes no value, but it makes
    the gradient the projection onto the constraint's tangent space: line searches
    (L-BFGS) and momentum then move along the constraint instead of fighting it. The
    normalised W is never formed: the codes and the reconstruction are scaled by the
    inverse row norms instead (terabrain.nn.shared_weight), so a step holds one W and one
    gradient.
    """

    hidden_unit_dims = {"weight": 0}

    def __init__(self, inputs: int, hidden: int, dropout: float = 0.0, seed: Optional[int] = None,
                 learn_scale: bool = True):
        super().__init__()
        self.init_seed = _draw_seed(seed)
        # With learn_scale False, alpha stays at min(1, inputs / hidden): the scale at which
        # unit rows forming a tight frame (W^T W = (hidden / inputs) I) reconstruct. Learned
        # together with W by L-BFGS, this one scalar's curvature (about |W^T W x|^2) dwarfs
        # every weight's once hidden >> inputs, and the shared inverse-Hessian scale then
        # leaves W where it started (docs/analysis.md, "RICA at K = 1,600").
        self.fixed_scale = None if learn_scale else min(1.0, inputs / hidden)
        self.weight = nn.Parameter(torch.empty(hidden, inputs))
        self.alpha = nn.Parameter(torch.empty(()), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.empty(inputs))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        if name == "weight":  # random directions: Gaussian rows scaled to unit norm
            init_by_unit_(tensor, 0, first_unit, self.init_seed, 0, "normal", 1.0)
            normalize_rows_(tensor)
        elif name == "alpha":
            tensor.fill_(1.0 if self.fixed_scale is None else self.fixed_scale)
        else:
            tensor.zero_()

    def unit_weight(self) -> torch.Tensor:
        return unit_rows(self.weight)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / self.weight.norm(dim=1).clamp_min(EPS)
        return self.alpha * (F.linear(self.dropout(x), self.weight) * scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, codes_w = unit_row_pair(self.dropout(x), self.weight, self.alpha)
        return codes, codes_w + self.bias

    @torch.no_grad()
    def normalize_(self) -> None:
        normalize_rows_(self.weight)

    def filters(self) -> torch.Tensor:
        # W itself, not a normalised copy: its rows are at unit norm from initialisation
        # on and after every step (normalize_), and a copy would cost a W-sized tensor.
        return self.weight.detach()


class Autoencoder(UnitInitialized):
    """``h = act(W1 x + b1)``, ``x' = out(W2 h + b2)`` with ``W2 = W1^T`` when tied."""

    def __init__(
        self,
        inputs: int,
        hidden: int,
        tied: bool = True,
        activation: str = "sigmoid",
        decoder_activation: str = "identity",
        dropout: float = 0.0,
        seed: Optional[int] = None,
    ):
        super().__init__()
        self.init_seed = _draw_seed(seed)
        self.bound = math.sqrt(6.0 / (inputs + hidden + 1))  # Glorot, as in the UFLDL SAE
        self.encoder = nn.Linear(inputs, hidden)
        self.tied = tied
        if tied:
            self.decoder_bias = nn.Parameter(torch.empty(inputs))
            self.hidden_unit_dims = {"encoder.weight": 0, "encoder.bias": 0}
        else:
            self.decoder = nn.Linear(hidden, inputs)
            self.hidden_unit_dims = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation]
        self.decoder_activation = _ACTIVATIONS[decoder_activation]
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        if name == "encoder.weight":
            init_by_unit_(tensor, 0, first_unit, self.init_seed, 1, "uniform", self.bound)
        elif name == "decoder.weight":
            init_by_unit_(tensor, 1, first_unit, self.init_seed, 2, "uniform", self.bound)
        else:
            tensor.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.encoder(self.dropout(x)))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        if self.tied:
            out = h @ self.encoder.weight + self.decoder_bias
        else:
            out = self.decoder(h)
        return self.decoder_activation(out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.tied:
            codes = self.encode(x)
            return codes, self.decode(codes)
        # One gradient buffer for the shared W (terabrain.nn.shared_weight).
        codes, codes_w = tied_pair(self.dropout(x), self.encoder.weight, self.encoder.bias,
                                   self.activation_name)
        return codes, self.decoder_activation(codes_w + self.decoder_bias)

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices (not biases): what weight decay applies to."""
        return [self.encoder.weight] + ([] if self.tied else [self.decoder.weight])

    def filters(self) -> torch.Tensor:
        return self.encoder.weight.detach()


class SupervisedHead(UnitInitialized):
    """A linear classifier or regressor on the features of a trained feature learner."""

    def __init__(
        self, features: UnitInitialized, hidden: int, outputs: int, dropout: float = 0.0,
        seed: Optional[int] = None,
    ):
        super().__init__()
        self.init_seed = _draw_seed(seed)
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, outputs, device=next(features.parameters()).device)
        self.hidden_unit_dims = {
            **{f"features.{k}": v for k, v in features.hidden_unit_dims.items()},
            "head.weight": 1,
        }
        self.bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default scale
        self.reset_head()

    @torch.no_grad()
    def reset_head(self) -> None:
        """Only the head: the features arrive trained."""
        for name, parameter in self.head.named_parameters():
            if parameter.device.type != "meta" and not hasattr(parameter, "placements"):
                self.init_parameter_(f"head.{name}", parameter.data, 0)

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        if name.startswith("features."):
            self.features.init_parameter_(name[len("features."):], tensor, first_unit)
        elif name == "head.weight":
            init_by_unit_(tensor, 1, first_unit, self.init_seed, 3, "uniform", self.bound)
        else:
            tensor.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features.encode(x)))
