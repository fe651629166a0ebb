"""Deep networks (Le et al. 2012; Ni et al. 2015): a stack of RICA layers (untied locally
connected, convolutional or dense, each with optional pooling and LCN), trained layer by
layer (greedy or pipelined). On a model axis, locally connected layers are split by output
rows with halo exchange and dense layers by hidden unit (terabrain.parallel.spatial_network).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from terabrain.config.sections import LCNConfig, Section
from terabrain.errors import ConfigError
from terabrain.learners.base import FilterPicture, Learner, ModelSection, Training
from terabrain.nn.deep import DeepNetwork, input_shape_from


class PoolConfig(Section):
    """Pooling after a layer (before LCN)."""

    kind: Literal["l2", "max", "avg"] = Field(
        "l2", description="l2: sqrt of the sum of squares in the window (Le et al. 2012)."
    )
    kernel: PositiveInt = Field(5, description="Window side.")
    stride: Optional[PositiveInt] = Field(None, description="null: the window side.")


class LayerConfig(Section):
    """One layer of a deep network, trained layer-wise with its own RICA objective."""

    kind: Literal["local", "conv", "dense"] = Field(
        "local",
        description="local: untied locally connected (a separate filter bank at every "
        "location); conv: shared filters (torch conv2d); dense: fully connected.",
    )
    maps: PositiveInt = Field(
        8, description="local/conv: output maps (filters per location); dense: hidden units."
    )
    kernel: PositiveInt = Field(8, description="local/conv: receptive field side.")
    stride: PositiveInt = Field(1, description="local/conv: step between receptive fields.")
    padding: Union[NonNegativeInt, tuple[NonNegativeInt, NonNegativeInt]] = Field(
        0,
        description="local/conv: zero rows and columns added around the input: n on every "
        "side, or [before, after] (top and left, bottom and right).",
    )
    tied: bool = Field(
        True,
        description="Decoder is the encoder's transpose (RICA). false: a separate decoder "
        "matrix, as in Le et al. 2012 (twice the weights).",
    )
    sparsity_weight: Optional[float] = Field(
        None, ge=0.0, description="This layer's lambda; null: objective.sparsity_weight."
    )
    pool: Optional[PoolConfig] = Field(None, description="Pooling after the layer.")
    lcn: Optional[LCNConfig] = Field(None, description="LCN after the layer (and pooling).")
    steps: Optional[PositiveInt] = Field(
        None, description="This layer's budget in layer-wise training; null: train.steps."
    )

    @property
    def padding_sides(self) -> tuple[int, int]:
        """(before, after) zeros; none for a dense layer, which has no spatial field."""
        if self.kind == "dense":
            return (0, 0)
        return (self.padding, self.padding) if isinstance(self.padding, int) else tuple(self.padding)


class DeepModel(ModelSection):
    """A stack of RICA layers, bottom first, trained layer by layer (docs/networks.md)."""

    kind: Literal["deep"] = Field(
        "deep", description="The feature learner (terabrain.learners): rica, autoencoder, deep, kmeans.")
    layers: list[LayerConfig] = Field(
        min_length=1, description="The layers, bottom first, each trained with RICA.",
    )
    input_shape: Optional[tuple[PositiveInt, PositiveInt, PositiveInt]] = Field(
        None,
        description="(channels, height, width) of the input images; null: from the data. "
        "Needed by `terabrain plan` for networks larger than any data here.",
    )
    schedule: Literal["greedy", "pipelined"] = Field(
        "greedy",
        description="greedy trains layer L+1 once layer L has finished (its "
        "budget or early stopping); pipelined starts it once layer L has trained "
        "model.start_after steps, feeding it from a copy of layer L refreshed every "
        "model.sync_every steps (Ni et al. 2015, section 3.1).",
    )
    start_after: PositiveInt = Field(
        100, description="pipelined: steps layer L trains before layer L+1 starts."
    )
    sync_every: PositiveInt = Field(
        10, description="pipelined: steps between refreshes of layer L's forward copy."
    )
    forward_copies: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="pipelined: the dtype of the frozen forward copies of the layers below "
        "the top one (bf16: half their memory; the layers that train stay as they are).",
    )


class DeepLearner(Learner):
    kind, section, objectives = "deep", DeepModel, ("rica",)

    def check(self, config):
        super().check(config)
        if config.model.schedule == "pipelined" and config.optimizer.name == "lbfgs":
            raise ValueError(
                "model.schedule pipelined trains several layers in one step and needs a "
                "per-parameter optimizer; optimizer.name allowed: sgd, adagrad, rmsprop, adam, "
                "adamw (or model.schedule greedy)"
            )
        if config.parallel.compression in ("onebit", "threshold", "adaptive"):
            raise ValueError(
                f"parallel.compression {config.parallel.compression} keeps an error-feedback "
                "residual per gradient tensor, and layer-wise training changes which layers "
                "have gradients from step to step; allowed for model.kind deep: none, fp16, bf16"
            )
        if config.parallel.mode == "hogwild":
            raise ValueError(
                "parallel.mode hogwild trains one model with lock-free workers and has no "
                "layer-wise schedule; allowed for model.kind deep: sync, localsgd"
            )

    def check_parallel(self, config, parallel):
        if parallel.model_ranks == 1:
            return
        if config.optimizer.name == "lbfgs":
            raise ConfigError(
                "optimizer.name: lbfgs is not supported for model.kind deep with parallel.model > 1 "
                "(its flat history would mix every rank's own rows); allowed: sgd, adagrad, "
                "rmsprop, adam, adamw")
        if config.supervised is not None:
            raise ConfigError(
                "supervised: not supported for model.kind deep with parallel.model > 1 (the head "
                "would need the features of every rank's rows); remove the supervised section or "
                "set parallel.model=1")

    def build(self, config, example_shape, seed):
        shape = input_shape_from(example_shape)
        declared = config.model.input_shape
        if declared is not None and tuple(declared) != shape:
            raise ConfigError(
                f"model.input_shape {list(declared)} does not match the data's images {list(shape)} "
                f"(channels, height, width); set it to null or to {list(shape)}"
            )
        try:
            return DeepNetwork(config.model.layers, shape, seed=seed)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def materialize(self, config, example_shape, parallel, device):
        if parallel.model_ranks == 1:
            torch.manual_seed(config.seed)
            return self.build(config, example_shape, config.seed).to(device)
        return super().materialize(config, example_shape, parallel, device)

    def parallelize(self, config, network, parallel, device):
        from terabrain.parallel.spatial_network import partition_network

        # Each rank creates only its rows' and units' parameters.
        return partition_network(network, parallel.model_mesh, device)

    def restore(self, config, example_shape, parallel, device, weights):
        network = self.materialize(config, example_shape, parallel, device)
        network.load_state_dict(weights)
        return network

    def training(self, config, network, parallel, example_shape):
        from terabrain.analysis.filters import filter_grid
        from terabrain.learners.layerwise import (
            LayerSchedule, LayerwiseModel, LayerwiseObjective, SpatialLayerwiseObjective,
        )

        model, train, layers = config.model, config.train, config.model.layers
        # Greedy training needs no forward copies: the layers below the one training have
        # finished. Pipelined: copies of the layers below the top one, in their own dtype.
        pipelined = model.schedule == "pipelined"
        trainable = LayerwiseModel(network, copies=pipelined, copy_dtype=(
            torch.bfloat16 if pipelined and model.forward_copies == "bf16" else None))
        schedule = LayerSchedule(
            trainable, [layer.steps or train.steps for layer in layers], model.schedule,
            model.start_after, model.sync_every,
            train.early_stopping.patience, train.early_stopping.min_delta,
        )
        split = parallel.model_ranks > 1
        objective = (SpatialLayerwiseObjective if split else LayerwiseObjective)(
            schedule,
            [config.objective.sparsity_weight if layer.sparsity_weight is None
             else layer.sparsity_weight for layer in layers],
            config.objective.sparsity_epsilon,
        )
        return Training(
            model=trainable, objective=objective, parameters=list(network.parameters()),
            schedule=schedule,
            # On a model axis each rank holds only its rows' filters: no picture during training.
            filter_image=None if split else lambda: filter_grid(*network.first_layer_filters()),
        )

    def parameter_count(self, network):
        from terabrain.parallel.spatial_network import whole_tensor_count

        return whole_tensor_count(network)

    def picture(self, config, network, weights, example_shape):
        whole = network
        if _is_split(network):  # each rank holds its rows: the gathered weights, whole
            whole = self.build(config, example_shape, config.seed)
            whole.load_state_dict(weights)
        filters, shape = whole.first_layer_filters()
        return FilterPicture(filters, shape, comparable=False)

    def feature_width(self, config, network):
        return math.prod(network.output_shape)

    def describe(self, config):
        kinds = ", ".join(layer.kind for layer in config.model.layers)
        return f"a deep network of {len(config.model.layers)} layers ({kinds})"

    def capacity(self, config, example_shape):
        from terabrain.learners.deep_capacity import deep_capacity

        return deep_capacity(config, example_shape)

    def memory_savings(self, config):
        """After the changes that leave the updates as they are (the optimizer in the
        backward pass), the schedule: greedy training keeps no forward copies and trains one
        layer at a time; then bf16 forward copies, then the optimizer and precision."""
        common = super().memory_savings(config)
        same_updates = [option for option in common if option == ["train.optimizer_in_backward=true"]]
        options = []
        if config.model.schedule == "pipelined":
            options.append(["model.schedule=greedy"])
            if config.model.forward_copies == "fp32":
                options.append(["model.forward_copies=bf16"])
        return same_updates + options + [o for o in common if o not in same_updates]


def _is_split(network: torch.nn.Module) -> bool:
    from terabrain.parallel.spatial_network import model_axis

    return model_axis(network) is not None
