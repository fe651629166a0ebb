"""The experiment's sections that every learner and data source shares: optimizer, training
stage, parallel layout, supervised stage and the objective. The ``model`` and ``data``
sections are owned by the learners (terabrain.learners) and the data sources
(terabrain.data.sources); terabrain.config.schema assembles all of them.

Field descriptions are the reference documentation: `terabrain show NAME` prints a built-in
experiment, and an error message quotes the field's path and allowed values.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

# Integers beyond int64 overflow every tensor and most C libraries they reach.
INT_LIMIT = 2**63
# Seeds are multiplied into torch and numpy generators' seeds; 32 bits is what users expect.
SEED_LIMIT = 2**32 - 1
# A day: longer than any collective or read should take, and well inside timedelta's range.
TIMEOUT_LIMIT_S = 86400.0


def _admits(annotation: Any, leaf: Callable[[Any], bool], value: Callable[[Any], bool],
            containers: tuple = ()) -> bool:
    """Whether some part of ``annotation`` passes ``leaf`` (a type) or ``value`` (a Literal's
    value), looking through Annotated, unions and ``containers`` (list, tuple)."""
    if leaf(annotation):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits(typing.get_args(annotation)[0], leaf, value, containers)
    if origin is Literal:
        return any(value(item) for item in typing.get_args(annotation))
    if origin in (Union, types.UnionType, *containers):
        return any(_admits(arg, leaf, value, containers) for arg in typing.get_args(annotation))
    return False


def _accepts_bool(annotation: Any) -> bool:
    return _admits(annotation, lambda t: t is bool or t is Any, lambda v: isinstance(v, bool))


def _numeric(annotation: Any) -> bool:
    """int or float, possibly optional or constrained: where a YAML ``true`` would become 1."""
    return _admits(annotation, lambda t: t in (int, float), lambda v: False)


def _accepts_str(annotation: Any) -> bool:
    """Whether a field takes text (a name, a path, a literal word): then "12" is not refused."""
    return _admits(
        annotation,
        lambda t: t is Any or (isinstance(t, type) and issubclass(t, (str, PurePath))),
        lambda v: isinstance(v, str), containers=(list, tuple))


def _only_bool(annotation: Any) -> bool:
    """A yes/no field (``bool`` or ``Optional[bool]``): 1, 0 and "yes" are not answers."""
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return len(args) == 1 and args[0] is bool
    return False


def _item_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return args[0] if args else Any
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) in (list, tuple):
                return _item_type(arg)
    return None


def applies_when(field: str, *values: str) -> dict[str, Any]:
    """``json_schema_extra`` of a field that means something only while the sibling ``field``
    has one of ``values`` (momentum for sgd/rmsprop, the L-BFGS settings for lbfgs...)."""
    return {"applies_when": {"field": field, "values": list(values)}}


class Section(BaseModel):
    """Unknown keys are errors, not silently ignored: a typo must not change an experiment.
    Floats must be finite, a boolean is not a number (``hidden: true`` is not 1), a number is
    not a boolean (``progress: 1`` is not true), text is not a number (``hidden: "12"``), and
    no integer leaves int64.

    A field marked with :func:`applies_when` is left out of `terabrain show` while it does not
    apply, and setting it to anything but its default while it does not apply is an error
    (it would be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_numbers(cls, data: Any) -> Any:
        # A model-level check: a field-level "before" validator is not allowed on the
        # discriminator fields (data.source, model.kind). "@name:" tells the loader's message
        # which field it is.
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None:
                continue
            annotation = field.annotation
            for item in value if isinstance(value, list) else [value]:
                numeric = _numeric(annotation) or _numeric(_item_type(annotation))
                if isinstance(item, bool) and not _accepts_bool(annotation) and numeric:
                    raise ValueError(f"@{name}: expected a number, got {str(item).lower()}")
                if isinstance(item, str) and numeric and not _accepts_str(annotation):
                    raise ValueError(f"@{name}: expected a number, got the text {item[:40]!r}")
                if _only_bool(annotation) and item is not None and not isinstance(item, bool):
                    raise ValueError(f"@{name}: expected true or false, got {str(item)[:40]}")
                if type(item) is int and not -INT_LIMIT <= item < INT_LIMIT:
                    raise ValueError(f"@{name}: integer out of range (must be between -2^63 "
                                     "and 2^63 - 1)")
        return data

    def inapplicable_fields(self) -> list[str]:
        """Fields that mean nothing with this section's current settings."""
        names = []
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            condition = extra.get("applies_when") if isinstance(extra, dict) else None
            if condition and getattr(self, condition["field"]) not in condition["values"]:
                names.append(name)
        return names

    @model_validator(mode="after")
    def _inapplicable_fields_left_at_default(self) -> "Section":
        for name in self.inapplicable_fields():
            info = type(self).model_fields[name]
            if getattr(self, name) != info.get_default(call_default_factory=True):
                condition = info.json_schema_extra["applies_when"]
                raise ValueError(
                    f"{name} applies only when {condition['field']} is "
                    f"{' or '.join(condition['values'])}, and {condition['field']} is "
                    f"{getattr(self, condition['field'])}; remove {name} or change "
                    f"{condition['field']}"
                )
        return self


class LCNConfig(Section):
    """Local contrast normalization (Ni et al. 2015; Jarrett et al. 2009): subtract a Gaussian-
    weighted local mean, divide by the local standard deviation."""

    kernel: PositiveInt = Field(9, description="Side of the Gaussian window, in positions.")
    sigma: Optional[PositiveFloat] = Field(
        None, description="Width of the Gaussian window; null: kernel / 4."
    )

    @model_validator(mode="after")
    def _odd(self) -> "LCNConfig":
        if self.kernel % 2 == 0:
            raise ValueError(f"lcn.kernel must be odd (a centred window), got {self.kernel}")
        return self


class OptimizerConfig(Section):
    """A torch.optim optimizer and its settings."""

    name: Literal["sgd", "adagrad", "rmsprop", "adam", "adamw", "lbfgs"] = Field(
        "lbfgs", description="An optimizer from torch.optim, by name."
    )
    lr: PositiveFloat = Field(1.0, description="Learning rate (L-BFGS: initial step length).")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd, rmsprop: momentum.",
                            json_schema_extra=applies_when("name", "sgd", "rmsprop"))
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0).",
                           json_schema_extra=applies_when("name", "sgd"))
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled from the objective.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam, adamw: betas.",
                                       json_schema_extra=applies_when("name", "adam", "adamw"))
    max_iter: PositiveInt = Field(
        25, description="lbfgs: iterations per training step (each on the full batch).",
        json_schema_extra=applies_when("name", "lbfgs"),
    )
    history_size: PositiveInt = Field(20, description="lbfgs: curvature pairs kept.",
                                       json_schema_extra=applies_when("name", "lbfgs"))
    line_search: Literal["strong_wolfe", "none"] = Field(
        "strong_wolfe", description="lbfgs: line search.",
        json_schema_extra=applies_when("name", "lbfgs"),
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimizerConfig":
        if self.nesterov and self.momentum <= 0.0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        return self


class EarlyStoppingConfig(Section):
    """Stop when the loss has stopped improving."""

    patience: int = Field(
        0, ge=0, description="Stop after this many logged steps without improvement; 0: never."
    )
    min_delta: float = Field(
        0.0, ge=0.0, description="Relative improvement of the loss that counts as progress."
    )


class TrainConfig(Section):
    """Steps, batches, logging and checkpoints of one training stage."""

    steps: PositiveInt = Field(12, description="Optimizer steps.")
    batch_size: Optional[PositiveInt] = Field(
        None, description="Examples per step; null: the full training set (L-BFGS)."
    )
    log_every: PositiveInt = Field(1, description="Steps between metrics lines.")
    checkpoint_every: int = Field(
        4, ge=0, description="Steps between checkpoints (0: only the final one)."
    )
    keep_checkpoints: PositiveInt = Field(2, description="Checkpoints kept on disk.")
    histogram_every: int = Field(
        0, ge=0, description="Steps between TensorBoard weight histograms (0: at the end)."
    )
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    optimizer_in_backward: bool = Field(
        False,
        description="Update each parameter as soon as its gradient is complete, inside the "
        "backward pass, and free that gradient: no gradient outlives its layer (SGD with "
        "momentum: 8 bytes per parameter instead of 12). Not with optimizer.name lbfgs nor "
        "parallel.data > 1.",
    )
    release_freed_buffers: Literal["auto", "always", "never"] = Field(
        "auto",
        description="always: every freed buffer above 1 MB goes back to the operating system "
        "at once (the lowest peak; each new one then faults its pages in); never: freed "
        "buffers up to 1 GiB stay in the heap for reuse (faster steps, a few % higher peak); "
        "auto: always where the model's weights, gradient and one optimizer state take at "
        "least 1/64 of physical memory, never elsewhere (docs/memory.md).",
    )
    progress: bool = Field(True, description="Show a progress bar on an interactive terminal.")
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT"]] = Field(
        ["SIGTERM", "SIGUSR1"],
        description="Signals that stop the run at a step boundary with a checkpoint and exit code 75 "
        "(pre-emption; SLURM: --signal=B:USR1@120): the next one, on several ranks the one after "
        "(they agree a step behind). []: none (the signals keep their default action). "
        "Read from the feature stage's train section; it covers the whole run.",
    )


class ParallelConfig(Section):
    """How ranks are laid out: a (data x model) mesh over the processes of the launcher."""

    data: int = Field(
        -1,
        description="Data-parallel replicas: the global batch is split evenly across them and "
        "gradients are averaged. -1: all ranks not used by `model`.",
    )
    model: int = Field(
        1, description="Model-parallel ranks per replica (1: no model parallelism)."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when CUDA is available, else gloo."
    )
    timeout_s: PositiveFloat = Field(
        300.0, le=TIMEOUT_LIMIT_S,
        description="Collective timeout: when a rank dies or hangs, the others stop with a "
        "message after at most this long.",
    )
    # --- gradient communication (docs/compression.md) ---
    mode: Literal["sync", "localsgd", "hogwild"] = Field(
        "sync",
        description="sync: gradients averaged every step (optionally compressed); localsgd: "
        "each replica steps on its own gradients and parameters are averaged every "
        "`average_every` steps; hogwild: `workers` lock-free processes on one machine update "
        "shared-memory parameters (one launcher rank only).",
    )
    compression: Literal["none", "fp16", "bf16", "onebit", "threshold", "adaptive"] = Field(
        "none",
        description="How sync data parallelism sends gradients. none: fp32 all-reduce; fp16 / "
        "bf16: half-precision all-reduce; onebit: signs + two values per column (Seide et "
        "al.); threshold: entries beyond +-threshold_tau as index+sign words (Strom); adaptive: "
        "the adaptive_proportion largest entries of each column (Dryden et al.). The last "
        "three use reduce-scatter + all-gather with re-quantization and error feedback; their "
        "per-column values and the vectors (biases) go in bf16, also with error feedback.",
    )
    overlap: bool = Field(
        True,
        description="Start averaging each gradient while the backward pass still runs (the "
        "large weight of a tied autoencoder or RICA block by block, other parameters whole) "
        "instead of in one buffer after it. The same results for 2 replicas; with more, to "
        "rounding (the ring sums in another order). false: one flat all-reduce after the "
        "backward pass.",
        json_schema_extra=applies_when("compression", "none"),
    )
    overlap_block_mb: PositiveFloat = Field(
        4.0, le=1024.0,
        description="overlap: about this many MiB of the large weight's gradient per "
        "all-reduce. Smaller blocks start sooner and leave less after the backward pass; "
        "each costs the collective's latency.",
        json_schema_extra=applies_when("compression", "none"),
    )
    error_feedback: bool = Field(
        True,
        description="onebit / threshold / adaptive: carry what quantization left out to the "
        "next step. Without it, they do not converge to the uncompressed result.",
        json_schema_extra=applies_when("compression", "onebit", "threshold", "adaptive"),
    )
    threshold_tau: PositiveFloat = Field(
        1e-3,
        description="threshold: the magnitude an accumulated gradient entry must exceed to be "
        "sent; it is reconstructed as +-tau. Scale it to the gradients (bench/compression.py "
        "calibrates it so about 1/32 of the entries are sent).",
        json_schema_extra=applies_when("compression", "threshold"),
    )
    adaptive_proportion: float = Field(
        1 / 32, gt=0.0, le=1.0,
        description="adaptive: fraction of each column's entries sent per step; 1/32 sends "
        "about as many bytes as onebit.",
        json_schema_extra=applies_when("compression", "adaptive"),
    )
    average_every: PositiveInt = Field(
        8, description="localsgd: steps between parameter averages (K).",
        json_schema_extra=applies_when("mode", "localsgd"),
    )
    workers: PositiveInt = Field(2, description="hogwild: worker processes.",
                                  json_schema_extra=applies_when("mode", "hogwild"))

    @model_validator(mode="after")
    def _communication_fits(self) -> "ParallelConfig":
        if self.compression != "none" and self.mode != "sync":
            raise ValueError(f"parallel.compression {self.compression!r} applies to "
                             f"parallel.mode sync only, got mode {self.mode!r}")
        return self


class SupervisedConfig(Section):
    """A classifier or regressor trained on top of the learned features, with labels."""

    task: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: cross-entropy over classes; regression: squared error.",
    )
    fine_tune: bool = Field(
        False, description="Also train the feature layer (otherwise it is frozen)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the features.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=0.01)
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=128, checkpoint_every=100)
    )


class NetworkTrainingConfig(Section):
    """Supervised training of the source network on the data's labels (cross-entropy of its
    outputs as logits), before its activations are taken."""

    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=0.001)
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=600, batch_size=128, log_every=20,
                                            checkpoint_every=200)
    )


class SourceNetworkConfig(Section):
    """A network whose activations at one layer are the feature learner's examples
    (docs/sae.md): a forward hook takes the layer's output as the data's examples pass
    through the network, and they are kept in memory, never written out unless ``cache``
    says so."""

    model: str = Field(
        description="The network: an import path module:callable (called with no arguments, "
        "it returns a torch.nn.Module), or a TorchScript file (.pt) whose module is a "
        "Sequential (a loaded TorchScript module takes no forward hooks).",
    )
    weights: Optional[Path] = Field(
        None, description="A safetensors state dict loaded into the network (null: the "
        "callable's own weights, or those training gives it).",
    )
    layer: str = Field(
        description="The layer whose output is taken: a name from the network's "
        "named_modules() (e.g. penultimate, features.3).",
    )
    input: Literal["images", "rows"] = Field(
        "images", description="How examples enter the network: images as (N, C, H, W), or "
        "rows as (N, D).",
    )
    training: NetworkTrainingConfig | None = Field(
        None, description="Train the network on the data's labels first (a stage of its own, "
        "checkpointed in network/); null: use it as it is.",
    )
    batch_size: PositiveInt = Field(
        1000, description="Examples per forward pass when taking activations and scoring.",
    )
    monitor_examples: int = Field(
        1000, ge=0, description="On every logged step of the feature learner, the network's "
        "accuracy and loss on this many held-out examples with the layer replaced by the "
        "reconstruction (metrics downstream_*); 0: only at the end.",
    )
    cache: Optional[Path] = Field(
        None, description="Also write the activations as .npy shards under this directory "
        "(train/, holdout/), which data.source activations reads; null: keep them in memory.",
    )

    @model_validator(mode="after")
    def _weights_exist(self) -> "SourceNetworkConfig":
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"source_network.weights: file not found: {self.weights}")
        return self


# --- objectives: what a feature learner minimises (each learner names those it accepts) ---


class RICAObjectiveConfig(Section):
    """RICA (Le et al. 2011; Ni et al. 2015, eq. 1): reconstruction error plus lambda times
    the smooth L1 sparsity of the codes."""

    kind: Literal["rica"] = "rica"
    sparsity_weight: float = Field(
        0.1, ge=0.0, description="lambda, the weight of the L1 sparsity of alpha W x."
    )
    sparsity_epsilon: PositiveFloat = Field(
        0.01, description="Smooth L1 as sqrt(h^2 + epsilon), differentiable at 0."
    )


class SparseAutoencoderObjectiveConfig(Section):
    """Squared error + beta KL(rho || mean activation) + weight decay (Ng's sparse
    autoencoder, as in Coates et al. 2011)."""

    kind: Literal["sparse_autoencoder"] = "sparse_autoencoder"
    rho: float = Field(0.05, gt=0.0, lt=1.0, description="Target mean activation.")
    beta: float = Field(3.0, ge=0.0, description="Weight of the KL term.")
    weight_decay: float = Field(
        0.0, ge=0.0,
        description="(weight_decay / 2) * sum of squared weights, part of the objective "
        "(unlike optimizer.weight_decay).",
    )


class ReconstructionObjectiveConfig(Section):
    """Squared reconstruction error (+ optional weight decay)."""

    kind: Literal["reconstruction"] = "reconstruction"
    weight_decay: float = Field(
        0.0, ge=0.0,
        description="(weight_decay / 2) * sum of squared weights, part of the objective "
        "(unlike optimizer.weight_decay).",
    )


OBJECTIVE_SECTIONS = (RICAObjectiveConfig, SparseAutoencoderObjectiveConfig,
                      ReconstructionObjectiveConfig)
ObjectiveConfig = Annotated[
    Union[RICAObjectiveConfig, SparseAutoencoderObjectiveConfig, ReconstructionObjectiveConfig],
    Field(discriminator="kind"),
]
