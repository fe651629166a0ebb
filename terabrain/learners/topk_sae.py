"""TopK sparse autoencoders on activations (Gao et al. 2024; BatchTopK, Bussmann et al.
2024; the ReLU + L1 baseline): ``model.kind: topk_sae``. The module is
terabrain.nn.topk_sae.TopKSAE; latents are split across the model axis by the hidden-unit
plan, with the exact sharded top-k of terabrain.parallel.latent_topk.

Capacity per rank, with b = batch / data rows, n inputs, h latents, m = model, k
(terabrain plan):

- weights: encoder and decoder rows (h/m x n each), encoder bias, dead-latent counter and
  firing-count parameter (h/m each), b_dec (n).
- gradients: encoder 1x, decoder 3x (decode, AuxK decode, the tangent projection), the
  latent vectors 1x, b_dec 1x.
- activations: 4 B x b x (9 h/m + 8 n).
- model axis, per step: the top-k candidates all-gathered ((m-1) x b x min(k, h/m) values;
  BatchTopK (m-1) x min(k b, b h/m); AuxK (m-1) x b x min(k_aux, h/m)), the reconstruction
  and the AuxK reconstruction all-reduced (2 x 2(m-1)/m x b x n x 4 B), b_dec's gradient
  through the encoder (2(m-1)/m x n x 4 B) and the scalars summed over latents.
  The analytical minimum to choose the k global winners is every rank receiving the other
  ranks' candidates, (m-1) x b x min(k, h/m) values, and to form the whole reconstruction
  on every rank a ring all-reduce of b x n values.
- data axis: one all-reduce of the local gradient shard (the firing counts included) and
  the logged values.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field, PositiveInt

from terabrain.capacity.costs import (
    FP32,
    optimizer_state,
    ring_all_gather,
    ring_all_reduce,
    weight_bytes,
)
from terabrain.capacity.planner import Capacity, RankFigures
from terabrain.data.eight_bit import unit_float
from terabrain.learners.base import ModelSection, Training
from terabrain.learners.hidden_units import HiddenUnitLearner, ParameterInfo
from terabrain.nn.topk_sae import TopKSAE
from terabrain.objectives import Objective
from terabrain.parallel.parallelism import local

LOSSY = ("onebit", "threshold", "adaptive")
GEOMETRIC_MEDIAN_ITERATIONS = 100


class TopKSAEModel(ModelSection):
    """A TopK sparse autoencoder: x -> relu(top-k of W_enc (x - b_dec) + b_enc) -> W_dec^T
    h + b_dec, decoder rows of unit norm, AuxK against dead latents (Gao et al. 2024)."""

    kind: Literal["topk_sae"] = Field(
        "topk_sae",
        description="The feature learner (terabrain.learners): rica, autoencoder, deep, topk_sae.")
    hidden: PositiveInt = Field(4096, description="Latents (the dictionary's size).")
    k: PositiveInt = Field(32, description="Latents active per example (on average, batchtopk).")
    activation: Literal["topk", "batchtopk", "relu"] = Field(
        "topk", description="topk: the k largest per example; batchtopk: the k x batch "
        "largest of the batch, and above a learnt threshold at inference; relu: every "
        "positive latent, with the L1 penalty model.l1_coefficient (the baseline).",
    )
    k_aux: Optional[PositiveInt] = Field(
        None, description="Dead latents that reconstruct the residual in the AuxK loss; "
        "null: half the input width.")
    aux_coefficient: float = Field(
        1.0 / 32, ge=0.0, description="Weight of the AuxK loss (0: off).")
    dead_after: PositiveInt = Field(
        100_000, description="A latent is dead once it has not fired for this many examples.")
    l1_coefficient: float = Field(
        0.0, ge=0.0, description="Weight of the L1 norm of the codes (activation relu).")
    pre_bias_init: Literal["median", "mean", "zeros"] = Field(
        "median", description="b_dec at the start: the geometric median or the mean of "
        "model.init_rows training rows, or zeros.")
    normalize_input: bool = Field(
        True, description="Scale inputs by one constant so that their mean squared norm is "
        "the input width (fitted on model.init_rows rows, saved with the weights).")
    init_rows: PositiveInt = Field(
        4096, description="Training rows used for b_dec and the input scale.")


class TopKSAEObjective(Objective):
    """Squared error of the normalised input (summed over inputs, mean over the batch),
    plus ``aux_coefficient`` x the AuxK loss (the dead latents' reconstruction of the
    residual, as a fraction of the data's variance) and ``l1_coefficient`` x the codes' L1.

    FVU and AuxK divide by the variance of the rows ``fit_to_data`` saw, not the batch's:
    every term is then a mean over examples, so a data-parallel average of replicas equals
    the global batch (Gao et al. divide by the batch variance; with large batches the two
    agree)."""

    logged_names = ("loss", "reconstruction", "fvu", "l0", "dead_fraction", "auxk", "l1")

    def __init__(self, dead_steps: int, aux_coefficient: float, l1_coefficient: float):
        self.dead_steps = dead_steps
        self.aux_coefficient = aux_coefficient
        self.l1_coefficient = l1_coefficient

    def __call__(self, model: TopKSAE, x, y=None):
        x = x.flatten(1)
        target = model.normalize(x)
        dead = model.dead(self.dead_steps)
        with torch.no_grad():
            dead_fraction = dead.float().mean()  # a mean: exact over latents split across ranks
        auxiliary = self.aux_coefficient > 0 and model.activation != "relu"
        if auxiliary:
            codes, reconstruction, aux_reconstruction = model(x, dead)
        else:
            codes, reconstruction = model(x)
        residual = target - reconstruction
        error = residual.pow(2).sum(dim=1).mean()
        fvu = error / model.data_variance
        loss = error
        aux = torch.zeros_like(error)
        if auxiliary:
            # With no dead latent the AuxK term would equal the FVU and train nothing: 0.
            aux = ((residual.detach() - aux_reconstruction).pow(2).sum(dim=1).mean()
                   / model.data_variance) * (dead_fraction > 0)
            loss = loss + self.aux_coefficient * aux
        l1 = codes.sum(dim=1).mean()
        if self.l1_coefficient > 0:
            loss = loss + self.l1_coefficient * l1
        loss = loss + model.firing_count(codes)  # zero; its gradient counts firings
        with torch.no_grad():
            l0 = (codes > 0).sum(dim=1).float().mean()
        return loss, {"reconstruction": error.detach(), "fvu": fvu.detach(), "l0": l0,
                      "dead_fraction": dead_fraction, "auxk": aux.detach(), "l1": l1.detach()}

    def after_step(self, model: TopKSAE) -> None:
        model.after_step_()


def geometric_median(points: torch.Tensor, iterations: int = GEOMETRIC_MEDIAN_ITERATIONS,
                     tolerance: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed distances to ``points`` (Weiszfeld's iteration,
    started at the mean)."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights.unsqueeze(1) * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tolerance * median.norm().clamp_min(1e-8):
            break
    return median


class TopKSAELearner(HiddenUnitLearner):
    kind, section, objectives = "topk_sae", TopKSAEModel, ("reconstruction",)

    def check(self, config):
        super().check(config)
        model = config.model
        if config.objective.weight_decay:
            raise ValueError("objective.weight_decay must be 0 for model.kind topk_sae "
                             "(its decoder rows are kept at unit norm)")
        if model.k > model.hidden:
            raise ValueError(f"model.k ({model.k}) must not exceed model.hidden ({model.hidden})")
        if config.optimizer.name == "lbfgs":
            raise ValueError("optimizer.name lbfgs does not fit model.kind topk_sae (a "
                             "non-smooth selection and per-step counters); allowed: sgd, "
                             "adagrad, rmsprop, adam, adamw")
        if config.parallel.mode != "sync" or config.parallel.compression in LOSSY:
            raise ValueError("model.kind topk_sae needs parallel.mode sync and "
                             "parallel.compression none, fp16 or bf16: the dead-latent "
                             "counts travel with the gradients and must arrive exactly")
        if config.train.batch_size is None:
            raise ValueError("model.kind topk_sae needs train.batch_size (model.dead_after "
                             "counts examples, turned into steps of that batch)")

    def build_module(self, model: TopKSAEModel, inputs, seed):
        return TopKSAE(inputs, model.hidden, model.k, model.activation, model.k_aux, seed=seed)

    def parallelize(self, config, network, parallel, device):
        network = parallel.parallelize(network, device)
        if parallel.model_mesh is not None:
            from terabrain.parallel.latent_topk import ShardedTopK

            network.selection = ShardedTopK(parallel.model_mesh)
        return network

    def fit_to_data(self, config, network, sample):
        """b_dec and the input scale from ``sample`` (the same rows on every rank)."""
        model = config.model
        rows = unit_float(sample[: model.init_rows]).flatten(1).float()
        scale = 1.0
        if model.normalize_input:
            scale = math.sqrt(rows.shape[1] / float(rows.pow(2).sum(dim=1).mean().clamp_min(1e-12)))
        rows = rows * scale
        if model.pre_bias_init == "median":
            start = geometric_median(rows)
        elif model.pre_bias_init == "mean":
            start = rows.mean(dim=0)
        else:
            start = torch.zeros(rows.shape[1])
        variance = float((rows - rows.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-12))
        with torch.no_grad():
            local(network.input_scale).fill_(scale)
            local(network.data_variance).fill_(variance)
            local(network.pre_bias).copy_(start.to(local(network.pre_bias).device))
        return {"input_scale": scale, "data_variance": variance,
                "pre_bias_init": model.pre_bias_init,
                "init_rows": rows.shape[0]}

    def dead_steps(self, config) -> int:
        return max(1, math.ceil(config.model.dead_after / config.train.batch_size))

    def training(self, config, network, parallel, example_shape):
        from terabrain.analysis.filters import filter_grid

        model = config.model
        objective = TopKSAEObjective(self.dead_steps(config), model.aux_coefficient,
                                     model.l1_coefficient)
        trained = [network.encoder, network.encoder_bias, network.decoder, network.pre_bias]
        return Training(
            model=network, objective=objective, parameters=trained,
            filter_image=lambda: filter_grid(local(network.filters()), example_shape),
        )

    def parameter_count(self, network):
        return sum(p.numel() for name, p in network.named_parameters()
                   if name in ("encoder", "encoder_bias", "decoder", "pre_bias"))

    def describe(self, config):
        m = config.model
        return f"{m.activation} sparse autoencoder with {m.hidden} latents (k = {m.k})"

    def plan_description(self, config, inputs):
        m = config.model
        return f"topk_sae {inputs:,} -> {m.hidden:,} latents, {m.activation} k={m.k}"

    # --- capacity (module docstring) -------------------------------------------------------

    def gradient_copies(self, config, name):
        return 3 if name == "decoder" else 1

    def capacity(self, config, example_shape):
        inputs = math.prod(example_shape)
        model = config.model
        hidden = model.hidden
        k_aux = min(model.k_aux if model.k_aux is not None else inputs // 2, hidden)
        params = [p for p in self.parameters_of(config, inputs)
                  if p.name not in ("input_scale", "data_variance", "threshold")]
        params.append(ParameterInfo("steps_since_fired", [hidden], hidden, "Shard(0)", 0))
        trained = ("encoder", "encoder_bias", "decoder", "pre_bias")
        total = sum(p.numel for p in params if p.name in trained)
        logged = len(TopKSAEObjective.logged_names)
        auxiliary = model.aux_coefficient > 0 and model.activation != "relu"
        # Values per row alive at the step's peak, which is one of two moments (measured
        # with MemTracker, tests/test_topk_sae.py): the end of the forward pass, before any
        # gradient exists, when every latent-sized tensor is alive (pre-activations, the
        # dense codes, and AuxK's masked pre-activations and codes); or the backward pass,
        # with the gradients allocated and fewer activations left. Input-sized values: the
        # normalised and centred input, the reconstruction, its error, their gradients.
        forward_latents, backward_latents = (7, 4) if auxiliary else (
            (4, 1) if model.activation == "relu" else (5, 1))  # + the top-k's selection
        input_values = 12 if auxiliary else 8
        def per_rank(data_ranks: int, model_ranks: int, rows: int) -> RankFigures:
            reasons = [f"model does not divide hidden ({hidden})"] if hidden % model_ranks else []
            block = -(-hidden // model_ranks)
            local_of = {p.name: -(-p.numel // model_ranks) if p.sharded else p.numel for p in params}
            local_elements = sum(local_of.values())
            local_trained = sum(local_of[name] for name in trained)
            gradient_elements = sum(p.gradient_copies * local_of[p.name] for p in params)
            forward = rows * (forward_latents * block + input_values * inputs)
            backward = rows * (backward_latents * block + input_values * inputs)
            # Summed with the gradients by the planner: the larger of the two moments.
            activation_elements = max(forward - gradient_elements, backward)
            sent = self.model_axis_bytes(config, inputs, model_ranks, rows, k_aux)
            size = weight_bytes(config.precision)  # per weight and per gradient element
            data_sent = ring_all_reduce(data_ranks, size * local_trained + FP32 * (block + logged))
            return RankFigures(
                reasons=reasons, local_parameters=local_elements,
                weights=size * local_elements,
                gradients=size * (max(local_of.values()) if config.train.optimizer_in_backward
                                  else gradient_elements),
                optimizer=FP32 * optimizer_state(config.optimizer, local_trained, total),
                activations=FP32 * activation_elements,
                model_axis_sent=round(sent), data_axis_sent=round(data_sent),
            )

        return Capacity(
            description=self.plan_description(config, inputs),
            parameters=total, hidden=hidden, parameter_table=params, per_rank=per_rank,
            notes=[
                "grads: encoder 1x, decoder 3x (decode, AuxK decode, tangent projection)",
                "activ: 4 B x batch/data x the larger of the forward pass's "
                + f"{forward_latents} latents/model + {input_values} inputs"
                + " less the gradients, and the backward pass's "
                + f"{backward_latents} latents/model + {input_values} inputs",
                "sent:model: top-k candidates all-gathered ((m-1) x rows x min(k, latents/m)"
                " values" + (", AuxK's too" if auxiliary else "") + "), the reconstruction"
                + (" and the AuxK reconstruction" if auxiliary else "") + " all-reduced",
            ],
        )

    @staticmethod
    def selection_bytes(config, model_ranks: int, rows: int, k_aux: int,
                        hidden: Optional[int] = None) -> float:
        """Bytes one rank sends to choose the winners: the all-gathered candidates."""
        model = config.model
        block = -(-(hidden or model.hidden) // model_ranks)
        if model.activation == "relu":
            return 0.0
        per_row = model.k if model.activation == "topk" else None
        candidates = (rows * min(per_row, block) if per_row is not None
                      else min(model.k * rows, block * rows))
        if model.aux_coefficient > 0:
            candidates += rows * min(k_aux, block)
        return ring_all_gather(model_ranks, FP32 * candidates * model_ranks)

    def model_axis_bytes(self, config, inputs: int, model_ranks: int, rows: int,
                         k_aux: int) -> float:
        model = config.model
        auxiliary = model.aux_coefficient > 0 and model.activation != "relu"
        reconstructions = 2 if auxiliary else 1
        scalars = 4  # the firing-count term, L1, L0 and the dead fraction
        return (self.selection_bytes(config, model_ranks, rows, k_aux)
                + ring_all_reduce(model_ranks, FP32 * rows * inputs * reconstructions)
                + ring_all_reduce(model_ranks, FP32 * (inputs + scalars)))
