"""What the fully connected learners (RICA, the autoencoders) share: one hidden layer whose
units are split across the model axis by the DTensor hidden-unit plan
(terabrain.parallel.hidden_unit_plan), filters that span a whole example, and the same capacity model.

Capacity per rank, with b = batch / data rows, n inputs, h hidden units, m = model, d = data
(checked against ``torch.distributed._tools.MemTracker`` and the collectives DTensor issues
in tests/test_plan.py):

- weights: 4 bytes per local element (Shard placements / m, Replicate whole).
- gradients: the working set at the peak of the backward pass, not just ``.grad``. The tied
  W of an autoencoder and RICA's W are used by the encoder and the decoder (and RICA's row
  normalisation), but their autograd functions (terabrain.nn.shared_weight) add every
  contribution into one buffer: 1x, like an untied matrix and the biases. Weight decay
  (objective.weight_decay > 0) adds a second W-sized contribution: 2x. Measured with
  bench/memory.py (docs/memory.md).
- activations: 4 * b * (3 h/m + 5 n) bytes: the input batch, the residual saved for the
  backward, its reduced copy, its square and the reconstruction's gradient (5 n per row),
  the codes, their gradient and the pre-activation gradient (3 h/m per row); +2 n with input
  dropout (mask and dropped copy), +n with a sigmoid decoder (its output is saved).
- model axis: the reconstruction is a partial sum over hidden units, all-reduced in the
  forward pass: 2 (m-1)/m * b * n * 4. Sums over hidden units add scalars: one for an
  autoencoder's loss with weight decay or KL, b + 1 for RICA (each row's L1, and the gradient
  of its replicated alpha). L-BFGS also all-gathers the sharded gradient into its replicated
  flat vector: (m-1)/m * 4 * (sharded elements).
- data axis: one all-reduce of the local gradient shard and the logged values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from pydantic import Field, PositiveInt

from terabrain.capacity.costs import (
    FP32, evaluations_per_step, optimizer_state, optimizer_transient, ring_all_gather,
    ring_all_reduce, weight_bytes,
)
from terabrain.capacity.planner import Capacity, RankFigures
from terabrain.learners.base import FilterPicture, Learner, ModelSection, Training
from terabrain.learners.hidden_unit_work import hidden_unit_work
from terabrain.objectives import build_objective
from terabrain.analysis.filters import MAX_FILTERS
from terabrain.parallel.parallelism import local
from terabrain.parallel.hidden_unit_plan import check_divisible, hidden_unit_plan

if TYPE_CHECKING:
    from terabrain.config.schema import ExperimentConfig

RECONSTRUCTION_ALL_REDUCES = 1  # forward only: the plan makes the reconstruction whole


class HiddenUnitSection(ModelSection):
    hidden: PositiveInt = Field(128, description="Hidden units (features, filters).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout probability on the input of the encoder."
    )


@dataclass
class ParameterInfo:
    name: str
    shape: list[int]
    numel: int
    placement: str
    """Placement on the model axis: ``Shard(0)``, ``Shard(1)`` or ``Replicate()``."""
    gradient_copies: int
    """Gradient-sized tensors alive at the peak of the backward pass (module docstring)."""
    in_blocks: bool = False
    """Its gradient is computed by the module itself in row blocks (terabrain.nn.
    shared_weight), so a data-parallel exchange with parallel.overlap reduces it block by
    block (where it is not split over the model axis)."""

    @property
    def sharded(self) -> bool:
        return self.placement.startswith("Shard")


class HiddenUnitLearner(Learner):
    """Base of the one-hidden-layer learners; subclasses build the module and count the
    gradient copies of their weights."""

    normalisation_streams = 0
    """Passes over the sharded weights per step that keep their rows at unit norm (RICA)."""

    def build_module(self, model: HiddenUnitSection, inputs: int,
                     seed: Optional[int]) -> torch.nn.Module:
        """The module of a ``model`` section for rows of ``inputs`` values."""
        raise NotImplementedError

    def gradient_copies(self, config: "ExperimentConfig", name: str) -> int:
        return 1

    def gradient_in_blocks(self, config: "ExperimentConfig", name: str) -> bool:
        """Whether the module computes parameter ``name``'s gradient itself, in row blocks,
        as its one contribution (terabrain.parallel.overlap then reduces it block by block)."""
        return False

    def activation_values_per_row(self, config: "ExperimentConfig", inputs: int,
                                  hidden_local: int) -> int:
        values = 3 * hidden_local + 5 * inputs
        if config.model.dropout > 0:
            values += 2 * inputs
        return values

    def plan_description(self, config: "ExperimentConfig", inputs: int) -> str:
        """The model in one line of `terabrain plan`'s report."""
        raise NotImplementedError

    def summed_scalars(self, config: "ExperimentConfig", rows: int) -> int:
        """Scalars summed over hidden units per evaluation (all-reduced on the model axis)."""
        return 0

    def build(self, config, example_shape, seed):
        return self.build_module(config.model, math.prod(example_shape), seed)

    def check_parallel(self, config, parallel):
        check_divisible(config.model.hidden, parallel.model_ranks)

    def parallelize(self, config, network, parallel, device):
        return parallel.parallelize(network, device)

    def training(self, config, network, parallel, example_shape):
        from terabrain.analysis.filters import filter_grid

        return Training(
            model=network, objective=build_objective(config.objective),
            parameters=list(network.parameters()),
            # Rank 0's own shard of the filters: TensorBoard runs on rank 0 only.
            filter_image=lambda: filter_grid(local(network.filters()), example_shape),
        )

    def picture(self, config, network, weights, example_shape):
        # The first units are rank 0's (hidden units are split in order), and a picture
        # shows at most MAX_FILTERS: no gathering, no copy of W.
        filters = local(network.filters())[:MAX_FILTERS].cpu()
        return FilterPicture(filters, example_shape, comparable=True)

    def feature_width(self, config, network):
        return config.model.hidden

    # --- capacity ---------------------------------------------------------------------

    def parameters_of(self, config: "ExperimentConfig", inputs: int) -> list[ParameterInfo]:
        """Every parameter with its model-axis placement, from a model built on the meta
        device (no memory is allocated, whatever its size)."""
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # leave the RNG as it was
            model = self.build_module(config.model, inputs, None)
        plan = hidden_unit_plan(model)
        return [
            ParameterInfo(name, list(p.shape), p.numel(), repr(plan[name]),
                          self.gradient_copies(config, name), self.gradient_in_blocks(config, name))
            for name, p in model.named_parameters() if p.requires_grad
        ]

    def capacity(self, config, example_shape):
        inputs = math.prod(example_shape)
        params = self.parameters_of(config, inputs)
        total = sum(p.numel for p in params)
        sharded = sum(p.numel for p in params if p.sharded)
        hidden = config.model.hidden
        evaluations = evaluations_per_step(config.optimizer)
        logged = len(build_objective(config.objective).logged_names)
        size = weight_bytes(config.precision)  # per weight and per gradient element

        def per_rank(data_ranks: int, model_ranks: int, rows: int) -> RankFigures:
            reasons = [f"model does not divide hidden ({hidden})"] if hidden % model_ranks else []
            local_of = {p.name: -(-p.numel // model_ranks) if p.sharded else p.numel for p in params}
            local_elements = sum(local_of.values())
            gradient_elements = sum(p.gradient_copies * local_of[p.name] for p in params)
            per_row = self.activation_values_per_row(config, inputs, -(-hidden // model_ranks))
            model_sent = ring_all_reduce(
                model_ranks, RECONSTRUCTION_ALL_REDUCES * FP32 * rows * inputs
            ) + ring_all_reduce(model_ranks, FP32 * self.summed_scalars(config, rows))
            if config.optimizer.name == "lbfgs":
                model_sent += ring_all_gather(model_ranks, FP32 * sharded)
            data_sent = ring_all_reduce(data_ranks, size * local_elements + FP32 * logged)
            return RankFigures(
                reasons=reasons, local_parameters=local_elements,
                weights=size * local_elements,
                # Updated inside the backward pass: one parameter's gradient at a time.
                gradients=size * (max(local_of.values()) if config.train.optimizer_in_backward
                                  else gradient_elements),
                optimizer=FP32 * (optimizer_state(config.optimizer, local_elements, total)
                                  + optimizer_transient(config.optimizer, max(local_of.values()),
                                                        config.precision,
                                                        over_dtensors=model_ranks > 1)),
                activations=FP32 * rows * per_row,
                model_axis_sent=round(evaluations * model_sent),
                data_axis_sent=round(evaluations * data_sent),
            )

        return Capacity(
            description=self.plan_description(config, inputs),
            parameters=total, hidden=hidden, parameter_table=params,
            evaluations_per_step=evaluations, per_rank=per_rank,
            work=hidden_unit_work(self, config, inputs, params, logged),
            notes=[
                "grads: the backward pass's peak gradient working set: one buffer per "
                "parameter (tied W and RICA's W included; 2x with weight decay)",
                "activ: 4 B x batch/data x (3 hidden/model + 5 inputs)",
                "sent:model: one ring all-reduce of the (batch/data x inputs) reconstruction "
                "per forward+backward, 2(m-1)/m x rows x inputs x 4 B",
            ],
        )
