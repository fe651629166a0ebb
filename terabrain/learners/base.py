"""What a learner is: everything about a feature learner that differs by ``model.kind``.

The trainer (terabrain.train.run), the capacity planner (terabrain.capacity) and the analysis
(terabrain.analysis) ask a ``Learner`` from the registry (terabrain.learners.registry); none
of them names a model kind. A learner owns its config section, builds its network (on the
meta device when asked), applies its parallel plan, chooses its objective and optional
layer-wise schedule, reports its capacity figures for `terabrain plan`, and gives the
analysis its filters and a description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from terabrain.config.sections import Section

if TYPE_CHECKING:
    from terabrain.capacity.planner import Capacity
    from terabrain.config.schema import ExperimentConfig
    from terabrain.parallel.parallelism import Parallelism


class ModelSection(Section):
    """The feature learner: a plain module with no parallelism inside."""


@dataclass
class Training:
    """What the trainer steps in a feature-learning stage."""

    model: torch.nn.Module
    """The module the trainer calls (the network, or a layer-wise view of it)."""
    objective: Any
    parameters: list[torch.nn.Parameter]
    """The parameters the optimizer updates."""
    schedule: Any = None
    """A layer-wise schedule (a trainer callback with ``total_budget`` and ``summary()``):
    it replaces the stage's early stopping and decides the number of steps."""
    filter_image: Optional[Callable[[], Any]] = None
    """An image of the filters for TensorBoard during training (None: no picture)."""
    optimizer: Optional[Callable[[list], torch.optim.Optimizer]] = None
    """The learner's own update rule, built from ``parameters`` (a learner that is not
    trained by gradient descent: k-means); None: the config's ``optimizer`` section."""

    def summary(self) -> dict[str, Any]:
        return {"layers": self.schedule.summary()} if self.schedule is not None else {}


@dataclass
class FilterPicture:
    """The first layer's filters as (units, values) with the image shape of one filter.
    ``comparable``: each filter spans a whole example, so it can be compared with random
    filters on held-out examples (terabrain.analysis.filters.compare_with_random)."""

    filters: torch.Tensor
    shape: tuple[int, ...]
    comparable: bool = False


class Learner:
    """Base of the registered learners; see the module docstring for the contract."""

    kind: str = ""
    section: type[ModelSection] = ModelSection
    objectives: tuple[str, ...] = ()
    """The objective.kind values this learner can minimise (the first is the default)."""

    def check(self, config: "ExperimentConfig") -> None:
        """Cross-field rules of this learner; raise ValueError naming the field and what is
        allowed."""
        if config.objective.kind not in self.objectives:
            raise ValueError(
                f"objective.kind {config.objective.kind!r} does not fit model.kind "
                f"{self.kind!r}; allowed: {', '.join(self.objectives)}"
            )

    def check_parallel(self, config: "ExperimentConfig", parallel: "Parallelism") -> None:
        """Rules that depend on the mesh, checked before anything is built (ConfigError)."""

    def build(self, config: "ExperimentConfig", example_shape: tuple[int, ...],
              seed: Optional[int]) -> torch.nn.Module:
        """The whole network for examples of ``example_shape``; built on whatever device is
        current (``with torch.device("meta")`` builds it without memory)."""
        raise NotImplementedError

    def parallelize(self, config: "ExperimentConfig", network: torch.nn.Module,
                    parallel: "Parallelism", device: torch.device) -> torch.nn.Module:
        """The network with this learner's parallel plan applied over ``parallel``'s mesh,
        on ``device``. A meta network gets each rank's own shard created and initialised."""
        raise NotImplementedError

    def materialize(self, config: "ExperimentConfig", example_shape: tuple[int, ...],
                    parallel: "Parallelism", device: torch.device) -> torch.nn.Module:
        """The network ready to train on this rank: built without memory, then each rank
        creates and initialises only its own shard (``parallelize``)."""
        torch.manual_seed(config.seed)
        with torch.device("meta"):
            network = self.build(config, example_shape, config.seed)
        return self.parallelize(config, network, parallel, device)

    def restore(self, config: "ExperimentConfig", example_shape: tuple[int, ...],
                parallel: "Parallelism", device: torch.device,
                weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A finished stage's network from its exported (whole) weights, placed as in training."""
        torch.manual_seed(config.seed)
        network = self.build(config, example_shape, config.seed)
        network.load_state_dict(weights)
        return self.parallelize(config, network.to(device), parallel, device)

    def fit_to_data(self, config: "ExperimentConfig", network: torch.nn.Module,
                    sample: torch.Tensor) -> dict[str, Any]:
        """Data-dependent initialisation before the first step (a sparse autoencoder's b_dec
        and input scale), from training rows that are the same on every rank; returns what
        to record in results.json. A resumed run then loads its checkpoint over it."""
        return {}

    def training(self, config: "ExperimentConfig", network: torch.nn.Module,
                 parallel: "Parallelism", example_shape: tuple[int, ...]) -> Training:
        raise NotImplementedError

    def parameter_count(self, network: torch.nn.Module) -> int:
        """Parameters of the whole network, however it is split across ranks."""
        return sum(p.numel() for p in network.parameters())

    def picture(self, config: "ExperimentConfig", network: torch.nn.Module,
                weights: dict[str, torch.Tensor], example_shape: tuple[int, ...]) -> FilterPicture:
        """The filters for ``filters.png``. Every rank calls this (it may gather); ``weights``
        are the whole network's exported tensors."""
        raise NotImplementedError

    def feature_width(self, config: "ExperimentConfig", network: torch.nn.Module) -> int:
        """Values per example of ``network.encode``: the input of a supervised head."""
        raise NotImplementedError

    def describe(self, config: "ExperimentConfig") -> str:
        raise NotImplementedError

    def capacity(self, config: "ExperimentConfig", example_shape: tuple[int, ...]) -> "Capacity":
        """Parameters, work and per-rank figures for `terabrain plan`, from a network built on
        the meta device."""
        raise NotImplementedError

    def memory_savings(self, config: ExperimentConfig) -> list[list[str]]:
        """Changes that lower this experiment's memory per rank, each a list of ``--set``
        assignments, the smallest change to the training first; `terabrain plan` tries them,
        alone and together, when the experiment as configured fits no split. Here: the
        optimizer in the backward pass (the same updates; a model of several large tensors
        then holds one gradient at a time), bf16 weights and gradients (fp32 optimizer
        state; the loss tracks fp32's), then the optimizer's state (SGD with momentum keeps
        one copy, plain SGD none, Adam two), which changes the training most."""
        optimizer, options = config.optimizer, []
        if (not config.train.optimizer_in_backward and optimizer.name != "lbfgs"
                and not getattr(config.objective, "weight_decay", 0)):
            options.append(["train.optimizer_in_backward=true"])
        if config.precision != "bf16-weights" and optimizer.name != "lbfgs":
            options.append(["precision=bf16-weights"])
        if optimizer.name in ("adam", "adamw", "rmsprop", "adagrad"):
            options.append(["optimizer.name=sgd", "optimizer.momentum=0.9"])
            options.append(["optimizer.name=sgd", "optimizer.momentum=0"])
        elif optimizer.name == "sgd" and optimizer.momentum > 0:
            options.append(["optimizer.momentum=0"])
        return options
