"""TopK sparse autoencoders of a network's activations (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"; BatchTopK: Bussmann et al. 2024).

``x`` is scaled by a fixed ``input_scale`` (chosen from the data so that E||x||^2 equals
the width, Gao et al. section 2.1), then::

    pre   = W_enc (x - b_dec) + b_enc                 (one value per latent)
    codes = relu(pre) on the selected latents, 0 elsewhere
    x_hat = W_dec^T codes + b_dec

Selection: ``topk`` keeps the k largest pre-activations of each example; ``batchtopk`` the
k x batch largest of the whole batch (k per example on average), and at inference every
pre-activation above a threshold learnt as a running mean of the smallest selected value;
``relu`` keeps every positive one (the L1-penalised baseline).

Ties are broken by the lower latent index (then the lower row), so the selection is a
function of the values alone: a split of the latents across ranks
(terabrain.parallel.latent_topk) selects exactly the same latents as one process.

The module is plain (no parallelism): the selection is a replaceable ``selection``
attribute, which a parallel plan swaps for its exact sharded version. The decoder's rows
are kept at unit norm (``after_step_``), and the component of their gradient parallel to
the row is removed before each optimizer step (a hook on the parameter), so an optimizer
moves along the sphere. Dead latents: ``steps_since_fired`` counts optimizer steps since
each latent last fired; ``fired`` is a zero parameter that is never optimised whose
gradient is each latent's firing count in the batch, so the data-parallel gradient
average tells every replica which latents fired anywhere.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from terabrain.nn.autoencoder import UnitInitialized, _draw_seed
from terabrain.nn.init import init_by_unit_
from terabrain.nn.unit_rows import normalize_rows_

ACTIVATIONS = ("topk", "batchtopk", "relu")
THRESHOLD_MOMENTUM = 0.01  # the running mean of BatchTopK's inference threshold


def ordered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``scores`` (rows, n) in the total order
    (value descending, position ascending): ``values`` and ``positions`` (rows, k) in that
    order, and the boolean ``mask`` (rows, n) of the chosen entries.

    ``torch.topk`` leaves the choice among equal values unspecified; here the lowest
    positions win, so the result depends on the values alone."""
    rows = scores.shape[0]
    kth = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(dim=1, keepdim=True)
    mask = above | (tied & (tied.cumsum(dim=1) <= room))
    positions = mask.nonzero()[:, 1].view(rows, k)  # ascending within each row
    values = scores.gather(1, positions)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), positions.gather(1, order), mask


def selection_rows(pre: torch.Tensor, per_example: bool) -> torch.Tensor:
    """The rows the selection ranks: each example (batch, latents), or the whole batch as
    one row in latent-major order (ties: lower latent, then lower example)."""
    return pre if per_example else pre.t().reshape(1, -1)


def selection_mask(chosen: torch.Tensor, pre: torch.Tensor, per_example: bool) -> torch.Tensor:
    """``chosen`` (from ``selection_rows``' layout) back in the (batch, latents) layout."""
    return chosen if per_example else chosen.view(pre.shape[1], pre.shape[0]).t()


class ExactTopK:
    """One process's selection: the latents of the ``k`` largest pre-activations per row
    (``per_example``) or of the whole batch; returns the (batch, latents) mask and the
    smallest selected value of each ranked row (batch, 1) or (1, 1)."""

    def __call__(self, pre: torch.Tensor, k: int, per_example: bool):
        rows = selection_rows(pre.detach(), per_example)
        values, _, chosen = ordered_topk(rows, min(k, rows.shape[1]))
        return selection_mask(chosen, pre, per_example), values[:, -1:]


def _keep_on_sphere(gradient: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient without its component along each (unit) row: the tangent direction."""
    return gradient - (gradient * rows).sum(dim=-1, keepdim=True) * rows


class TopKSAE(UnitInitialized):
    """A sparse autoencoder with ``latents`` decoder rows of ``inputs`` values (module
    docstring). ``k``: latents per example; ``k_aux``: the dead latents that reconstruct
    the residual in the AuxK loss."""

    def __init__(self, inputs: int, latents: int, k: int, activation: str = "topk",
                 k_aux: Optional[int] = None, seed: Optional[int] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        self.init_seed = _draw_seed(seed)
        self.inputs, self.latents, self.k, self.activation = inputs, latents, k, activation
        self.k_aux = min(k_aux if k_aux is not None else inputs // 2, latents)
        self.encoder = nn.Parameter(torch.empty(latents, inputs))
        self.encoder_bias = nn.Parameter(torch.empty(latents))
        self.decoder = nn.Parameter(torch.empty(latents, inputs))  # one row per latent
        self.pre_bias = nn.Parameter(torch.empty(inputs))  # b_dec
        # State kept as parameters (never optimised) so a parallel plan places it like the
        # weights: sharded per latent, checkpointed and resharded with them.
        self.input_scale = nn.Parameter(torch.empty(()), requires_grad=False)
        # E||x - mean||^2 of the normalised data: FVU's denominator, fixed so that it does not
        # depend on the batch (a data-parallel mean of per-replica FVUs is then the FVU).
        self.data_variance = nn.Parameter(torch.empty(()), requires_grad=False)
        self.threshold = nn.Parameter(torch.empty(()), requires_grad=False)
        self.steps_since_fired = nn.Parameter(torch.empty(latents), requires_grad=False)
        self.fired = nn.Parameter(torch.empty(latents))
        self.hidden_unit_dims = {"encoder": 0, "encoder_bias": 0, "decoder": 0,
                                 "steps_since_fired": 0, "fired": 0}
        self.selection = ExactTopK()
        self.__dict__["_projected"] = None  # a weak reference to the hooked decoder
        self.reset_parameters()

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, first_unit: int = 0) -> None:
        if name in ("encoder", "decoder"):
            # The encoder starts as the decoder's transpose: the same unit rows (Gao et al.).
            init_by_unit_(tensor, 0, first_unit, self.init_seed, 0, "normal", 1.0)
            normalize_rows_(tensor)
        elif name in ("input_scale", "data_variance"):
            tensor.fill_(1.0)
        else:
            tensor.zero_()

    # --- the forward pass ---------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the units the autoencoder works in."""
        return x * self.input_scale

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc (x - b_dec) + b_enc`` of a normalised input."""
        return F.linear(x - self.pre_bias, self.encoder, self.encoder_bias)

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """The codes: relu(pre) on the selected latents (see the module docstring)."""
        positive = torch.relu(pre)
        if self.activation == "relu":
            return positive
        if self.activation == "batchtopk" and not self.training:
            return positive * (pre > self.threshold)
        per_example = self.activation == "topk"
        mask, kth = self.selection(pre, self.k * (1 if per_example else pre.shape[0]),
                                   per_example)
        if not per_example and self.training:
            with torch.no_grad():
                self.threshold.lerp_(kth.mean().clamp_min(0), THRESHOLD_MOMENTUM)
        return positive * mask

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of raw inputs (for the analysis and a supervised head)."""
        return self.select(self.pre_activations(self.normalize(x)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self._decoder_rows() + self.pre_bias

    def forward(self, x: torch.Tensor, dead: Optional[torch.Tensor] = None):
        """``(codes, reconstruction)`` of a raw input, the reconstruction in normalised units
        (compare it with ``normalize(x)``); with a ``dead`` mask also the AuxK
        reconstruction of the residual by the dead latents (no bias). Every sum over
        latents leaves through ``forward``, where a parallel plan completes it."""
        pre = self.pre_activations(self.normalize(x))
        codes = self.select(pre)
        if dead is None:
            return codes, self.decode(codes)
        auxiliary = self.auxiliary_codes(pre, dead)
        return codes, self.decode(codes), auxiliary @ self._decoder_rows()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction in the input's own units (to splice into a network)."""
        return self.forward(x)[1] / self.input_scale

    def dead(self, after_steps: int) -> torch.Tensor:
        """Latents that have not fired for ``after_steps`` optimizer steps."""
        return self.steps_since_fired >= after_steps

    def auxiliary_codes(self, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """The AuxK codes: the ``k_aux`` largest pre-activations among dead latents."""
        scores = torch.where(dead, pre.detach(), torch.full_like(pre.detach(), -torch.inf))
        mask, _ = self.selection(scores, self.k_aux, True)
        return torch.relu(pre) * (mask & dead)

    def firing_count(self, codes: torch.Tensor) -> torch.Tensor:
        """A zero-valued term whose gradient on ``fired`` is each latent's firing count."""
        return (self.fired * (codes.detach() > 0).sum(dim=0).to(self.fired.dtype)).sum()

    def _decoder_rows(self) -> torch.Tensor:
        weight = self.decoder
        if weight.requires_grad and torch.is_grad_enabled():
            hooked = self.__dict__["_projected"]
            if hooked is None or hooked() is not weight:  # new parameter (a plan placed it)
                weight.register_hook(lambda gradient, rows=weight: _keep_on_sphere(gradient, rows))
                self.__dict__["_projected"] = weakref.ref(weight)
        return weight

    # --- after each optimizer step --------------------------------------------------------

    @torch.no_grad()
    def after_step_(self) -> None:
        """Decoder rows back on the unit sphere; dead-latent counters advanced."""
        normalize_rows_(self.decoder)
        if self.fired.grad is not None:
            fired = self.fired.grad > 0
            self.steps_since_fired.copy_(torch.where(fired, torch.zeros_like(
                self.steps_since_fired), self.steps_since_fired + 1))
            # The optimizer does not own ``fired``, so its zero_grad would leave the count
            # to accumulate into the next step's.
            self.fired.grad = None

    def filters(self) -> torch.Tensor:
        return self.decoder.detach()

    def __getstate__(self):  # the weak reference cannot be pickled
        state = self.__dict__.copy()
        state["_projected"] = None
        return state
