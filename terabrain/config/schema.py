"""The experiment schema: every field a user can set, with what it means and what is allowed.

``model`` and ``data`` are discriminated unions on ``model.kind`` and ``data.source``: each
learner (terabrain.learners.registry) and each data source (terabrain.data.sources) declares
only its own fields, so `terabrain show NAME` prints what applies to that experiment and a
field of another variant is refused with one line naming the fields that do apply.

Field descriptions are the reference documentation (docs/config.md is generated from them).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from terabrain.config.sections import (  # noqa: F401  (re-exported: the schema's sections)
    OBJECTIVE_SECTIONS,
    SEED_LIMIT,
    EarlyStoppingConfig,
    LCNConfig,
    NetworkTrainingConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    ReconstructionObjectiveConfig,
    RICAObjectiveConfig,
    Section,
    SourceNetworkConfig,
    SparseAutoencoderObjectiveConfig,
    SupervisedConfig,
    TrainConfig,
)
from terabrain.data.sources import DEFAULT_SOURCE, SOURCES, DataConfig, source_of
from terabrain.learners.deep import LayerConfig, PoolConfig  # noqa: F401  (re-exported)
from terabrain.learners.registry import DEFAULT_KIND, LEARNERS, ModelConfig, learner_of

# Fields an earlier layout kept in the train section: they belong to the model kind named
# here. A file written for that layout still loads (the value moves into the model section);
# `terabrain show` prints the new layout.
MOVED_FROM_TRAIN = {"schedule": "deep", "start_after": "deep", "sync_every": "deep"}


class ExperimentConfig(Section):
    """One experiment: the same file runs on a laptop or on a cluster."""

    name: str = Field("experiment", description="Used in the run directory's name.")
    description: str = Field("", description="One line shown by `terabrain configs`.")
    seed: int = Field(0, ge=0, le=SEED_LIMIT,
                      description="Seeds data sampling, initialisation and batching.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is present, else CPU."
    )
    precision: Literal["fp32", "bf16", "bf16-weights"] = Field(
        "fp32", description="bf16: autocast matmuls to bfloat16; weights stay fp32. "
        "bf16-weights: weights and gradients stored in bfloat16 (half the memory), optimizer "
        "state in fp32, each update rounded stochastically into the weights (optimizer.name "
        "sgd, adam or adamw)."
    )
    data: DataConfig = Field(
        default_factory=lambda: SOURCES[DEFAULT_SOURCE].section(),
        description="Where examples come from and how they are preprocessed; its fields "
        f"depend on data.source ({', '.join(SOURCES)}).",
    )
    model: ModelConfig = Field(
        default_factory=lambda: LEARNERS[DEFAULT_KIND].section(),
        description="The feature learner; its fields depend on model.kind "
        f"({', '.join(LEARNERS)}).",
    )
    objective: ObjectiveConfig = Field(
        default_factory=RICAObjectiveConfig,
        description="What the feature learner minimises; its fields depend on objective.kind "
        "(null kind: the learner's default).",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    source_network: Optional[SourceNetworkConfig] = Field(
        None, description="Train the feature learner on the activations of a layer of this "
        "network, taken as the data's examples pass through it (null: on the data itself)."
    )
    supervised: Optional[SupervisedConfig] = Field(
        None, description="Optional second stage on labels (digits, lfw, fashion-mnist, npy "
        "with labels_path)."
    )

    @model_validator(mode="before")
    @classmethod
    def _sections_own_their_fields(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = _own_fields(dict(raw))
        return raw

    @model_validator(mode="after")
    def _compatible(self) -> "ExperimentConfig":
        learner_of(self).check(self)
        if self.supervised is not None and not source_of(self.data).has_labels(self.data):
            raise ValueError(
                f"supervised needs labelled data in memory; data.source {self.data.source} "
                "has none here (allowed: digits, lfw, fashion-mnist, npy with data.labels_path "
                "and data.stream false)")
        if self.precision == "bf16-weights" and self.optimizer.name not in ("sgd", "adam", "adamw"):
            raise ValueError(
                f"precision bf16-weights updates bf16 weights from fp32 state for optimizer.name "
                f"sgd, adam or adamw, not {self.optimizer.name}; use one of those or precision "
                "fp32 / bf16")
        if self.train.optimizer_in_backward and self.optimizer.name == "lbfgs":
            raise ValueError(
                "train.optimizer_in_backward: L-BFGS needs every gradient before it steps; "
                "allowed with optimizer.name sgd, adagrad, rmsprop, adam, adamw")
        if self.train.optimizer_in_backward and getattr(self.objective, "weight_decay", 0):
            raise ValueError(
                "train.optimizer_in_backward: objective.weight_decay adds a second gradient "
                "contribution to W after its update; set objective.weight_decay to 0 (or use "
                "optimizer.weight_decay)")
        if self.train.optimizer_in_backward and self.parallel.mode == "hogwild":
            raise ValueError(
                "train.optimizer_in_backward: parallel.mode hogwild runs its own update loop; "
                "allowed with parallel.mode sync, localsgd")
        network = self.source_network
        if network is not None and network.training is not None and not source_of(
                self.data).has_labels(self.data):
            raise ValueError(
                f"source_network.training needs labelled data in memory; data.source "
                f"{self.data.source} has none here (allowed: digits, lfw, fashion-mnist, npy "
                "with data.labels_path and data.stream false; or source_network.training null)")
        lossy = self.parallel.compression in ("onebit", "threshold", "adaptive")
        if self.optimizer.name == "lbfgs" and (lossy or self.parallel.mode != "sync"):
            what = (f"parallel.compression {self.parallel.compression}" if lossy
                    else f"parallel.mode {self.parallel.mode}")
            raise ValueError(
                f"{what} needs a stochastic optimizer (optimizer.name sgd, adagrad, rmsprop, "
                f"adam, adamw): L-BFGS's line search needs exact, synchronized gradients")
        return self


# --- sections that own their fields -------------------------------------------------------


def _field_defaults(sections) -> dict[str, list[Any]]:
    """Every field name of ``sections`` -> the defaults it has in them."""
    defaults: dict[str, list[Any]] = {}
    for section in sections:
        for name, info in section.model_fields.items():
            defaults.setdefault(name, []).append(info.get_default(call_default_factory=True))
    return defaults


def _section_fields(
    raw: dict[str, Any], section: str, tag: str, variants: dict[str, type[Section]],
) -> None:
    """Check ``raw[section]`` against the variant its ``tag`` names. A field of another
    variant is refused with one line; one that still has its default value (as the files of
    the earlier, single-section layout wrote every field) is dropped."""
    body = raw.get(section)
    if not isinstance(body, dict):
        return  # absent (the default), or pydantic reports the type
    chosen = body.get(tag)  # _own_fields has filled in the default
    if not isinstance(chosen, str) or chosen not in variants:
        return  # pydantic reports the allowed values
    own = variants[chosen].model_fields
    others = _field_defaults(v for k, v in variants.items() if k != chosen)
    for name in list(body):
        if name in own or name not in others:
            continue  # unknown names are pydantic's "unknown key"
        value = body[name]
        if value is None or value == [] or any(_same(value, d) for d in others[name]):
            del body[name]
            continue
        fields = ", ".join(n for n in own if n != tag)
        raise ValueError(f"{section}.{name} is not a field of {section}.{tag}={chosen}; "
                         f"its fields are {fields}")


def _same(value: Any, default: Any) -> bool:
    if hasattr(default, "model_dump"):
        default = default.model_dump(mode="json")
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default


def _own_fields(raw: dict[str, Any]) -> dict[str, Any]:
    for section in ("model", "data", "objective", "train"):
        if isinstance(raw.get(section), dict):
            raw[section] = dict(raw[section])
    train = raw.get("train")
    for name, owner in MOVED_FROM_TRAIN.items():
        if not isinstance(train, dict) or name not in train:
            continue
        value = train.pop(name)
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        if model.get("kind", DEFAULT_KIND) == owner:
            model.setdefault(name, value)
            raw["model"] = model
        elif value not in (None, LEARNERS[owner].section.model_fields[name].default):
            raise ValueError(f"train.{name} is now model.{name}, a field of model.kind={owner} only")
    model = raw.get("model")
    kind = model.get("kind", DEFAULT_KIND) if isinstance(model, dict) else DEFAULT_KIND
    objective = raw.get("objective")
    if isinstance(kind, str) and kind in LEARNERS and (objective is None or (isinstance(objective, dict)
                                                   and objective.get("kind") is None)):
        objective = dict(objective or {})
        objective["kind"] = LEARNERS[kind].objectives[0]
        raw["objective"] = objective
    if isinstance(model, dict):
        model.setdefault("kind", DEFAULT_KIND)
    if isinstance(raw.get("data"), dict):
        raw["data"].setdefault("source", DEFAULT_SOURCE)
    _section_fields(raw, "model", "kind", {k: v.section for k, v in LEARNERS.items()})
    _section_fields(raw, "data", "source", {k: v.section for k, v in SOURCES.items()})
    _section_fields(raw, "objective", "kind", {s.model_fields["kind"].default: s
                                               for s in OBJECTIVE_SECTIONS})
    return raw
