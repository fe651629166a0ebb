"""`terabrain plan`: how an experiment would split over N devices. For every (data x model)
mesh of N ranks: memory per rank and bytes each rank sends per step, without allocating the
model (learners build it on the meta device, so planning a 78.6-billion-parameter
autoencoder takes milliseconds).

The planner itself knows no model kind and no data source. It asks the data source table
(terabrain.data.sources) for the example shape, the training rows and the bytes the trainer
keeps, and the learner (terabrain.learners) for its parameters and per-rank figures; it
enumerates the splits, marks those that fit in ``headroom * device memory`` and recommends
the one that fits and sends the fewest bytes. The counting rules of each learner are in its
module's docstring (terabrain.learners.hidden_units, terabrain.learners.deep_capacity).

Ring collectives: an all-reduce of S bytes over k ranks sends 2 (k-1)/k * S per rank, an
all-gather (k-1)/k * S. SGD, Adam and the others evaluate the closure once per step;
L-BFGS about max_iter + 1 times, so its per-step figures are that many evaluations.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from terabrain.capacity.costs import FP32
from terabrain.units import format_bytes, format_count, format_seconds
from terabrain.errors import ConfigError

if TYPE_CHECKING:
    from terabrain.capacity.profile import MachineProfile
    from terabrain.capacity.work import StepWork
    from terabrain.config.schema import ExperimentConfig

DEFAULT_HEADROOM = 0.9


@dataclass
class RankFigures:
    """A learner's figures for one rank of one (data, model) split."""

    reasons: list[str]
    """Why the learner cannot run on this mesh (empty when it can)."""
    local_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    model_axis_sent: int
    data_axis_sent: int


@dataclass
class Capacity:
    """What a learner tells the planner (Learner.capacity)."""

    description: str
    parameters: int
    hidden: int
    per_rank: Callable[[int, int, int], RankFigures]
    """(data ranks, model ranks, batch rows per replica) -> that rank's figures."""
    evaluations_per_step: int = 1
    parameter_table: list = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """How this learner's columns are counted, for the report."""
    work: Optional[Callable[[int, int, int], "StepWork"]] = None
    """(data ranks, model ranks, batch rows per replica) -> that rank's work per step
    (terabrain.capacity.work), for the step-time forecast; None: no forecast."""


@dataclass
class Split:
    data: int
    model: int
    valid: bool
    reason: str
    """Empty when valid; else why the mesh cannot run this experiment."""
    rows_per_rank: int
    local_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    dataset: int
    bf16_copy: int
    total: int
    fits: bool
    model_axis_sent: int
    data_axis_sent: int
    sent: int
    configured: bool = False
    recommended: bool = False
    # The step-time forecast (`--profile`; terabrain.capacity.timing), None without one.
    step_time_s: Optional[float] = None
    compute_s: Optional[float] = None
    communication_s: Optional[float] = None
    exposed_s: Optional[float] = None
    read_s: Optional[float] = None
    images_per_s: Optional[float] = None
    epoch_s: Optional[float] = None

    @property
    def other(self) -> int:
        return self.dataset + self.bf16_copy

    @property
    def status(self) -> str:
        if not self.valid:
            return f"no: {self.reason}"
        return "yes" if self.fits else "no: memory"


@dataclass
class Plan:
    experiment: str
    model: str
    inputs: int
    hidden: int
    parameters: int
    parameter_table: list
    batch: int
    train_rows: Optional[int]
    optimizer: str
    evaluations_per_step: int
    devices: int
    device_memory: int
    headroom: float
    splits: list[Split]
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    """Deep networks: one row per layer (terabrain.learners.deep_capacity.layer_table)."""
    profile: Optional[str] = None
    """The machine profile the step times come from (None: no forecast)."""
    gpus_per_node: Optional[int] = None
    dataset_size: Optional[int] = None
    """Examples per epoch for epoch_s (the training rows when the source knows them)."""
    fits_with: dict[str, Any] | None = None
    """When no split fits as configured: the first of the learner's memory savings
    (Learner.memory_savings) that makes one fit, its settings and that split's figures."""

    @property
    def usable_memory(self) -> int:
        return int(self.device_memory * self.headroom)

    @property
    def recommended(self) -> Optional[Split]:
        return next((s for s in self.splits if s.recommended), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usable_memory"] = self.usable_memory
        out["recommended"] = (
            {"data": self.recommended.data, "model": self.recommended.model}
            if self.recommended else None
        )
        for split, raw in zip(self.splits, out["splits"]):
            raw["status"] = split.status
            raw["other"] = split.other
            raw["peak_bytes"] = split.total
            raw["sent_bytes"] = split.sent
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class UnaddressableModel(ConfigError):
    """A size so large that torch cannot form even a meta tensor of it: no machine holds it,
    so `train` refuses it as it refuses a model too large for this one."""


def integer_fields(config: "ExperimentConfig", sections: tuple[str, ...]
                   ) -> list[tuple[str, str, int]]:
    """``(section, name, value)`` for every integer field of ``sections``: the sizes."""
    return [(section, name, value) for section in sections
            for name, value in getattr(config, section).model_dump().items()
            if type(value) is int]


def _largest_size(config: "ExperimentConfig") -> str:
    """``section.field=value`` for the largest integer field of the model and data sections,
    the ones that set the tensors' sizes."""
    section, name, value = max(integer_fields(config, ("model", "data")), key=lambda f: f[2])
    return f"{section}.{name}={value}"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def configured_split(config: "ExperimentConfig", devices: int) -> Optional[tuple[int, int]]:
    """The (data, model) the experiment's `parallel` section gives on ``devices`` ranks."""
    data, model = config.parallel.data, config.parallel.model
    if data == -1 and model >= 1 and devices % model == 0:
        data = devices // model
    elif model == -1 and data >= 1 and devices % data == 0:
        model = devices // data
    return (data, model) if data >= 1 and model >= 1 and data * model == devices else None


def data_shape(config: "ExperimentConfig") -> tuple[tuple[int, ...], Optional[int]]:
    """(one example's shape, training rows or None when streamed), from the config alone."""
    from terabrain.data.sources import source_of

    source = source_of(config.data)
    shape, rows = source.example_shape(config.data), source.training_rows(config.data)
    network = config.source_network
    if network is not None:  # the learner's examples are the layer's activations
        from terabrain.source_network import layer_width

        shape = (layer_width(network.model, network.layer, shape, network.input),)
    return shape, rows


def plan_experiment(
    config: "ExperimentConfig",
    devices: int,
    device_memory: int,
    *,
    batch: Optional[int] = None,
    headroom: float = DEFAULT_HEADROOM,
    profile: Optional["MachineProfile"] = None,
    gpus_per_node: Optional[int] = None,
    dataset_size: Optional[int] = None,
    find_savings: bool = True,
) -> Plan:
    """Memory per rank and bytes sent per step for every (data, model) with data * model =
    ``devices``; marks the ones that fit in ``headroom * device_memory`` and recommends the
    one that fits and sends the fewest bytes. With a machine ``profile``, every valid split
    also gets its predicted step time (terabrain.capacity.timing) and the recommendation is
    the fastest split that fits (fewest bytes among equals)."""
    from terabrain.data.sources import source_of
    from terabrain.learners.registry import learner_of

    if devices < 1:
        raise ConfigError(f"--gpus must be at least 1, got {devices}")
    if device_memory <= 0:
        raise ConfigError(f"--gpu-memory must be more than 0 bytes, got {device_memory}")
    if not 0 < headroom <= 1:
        raise ConfigError(f"--headroom must be in (0, 1], got {headroom}")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")

    shape, train_rows = data_shape(config)
    if batch is None:
        if config.train.batch_size is None and train_rows is None:
            raise ConfigError(
                f"train.batch_size: data.source {config.data.source} is streamed, so the batch "
                "cannot be the whole data set; set train.batch_size or pass --batch")
        batch = config.train.batch_size or train_rows
        if train_rows is not None:
            batch = min(batch, train_rows)
    try:
        capacity = learner_of(config).capacity(config, shape)
    except RuntimeError as error:  # torch's "Storage size calculation overflowed", even on meta
        if "overflow" not in str(error):
            raise
        raise UnaddressableModel(
            f"the model's tensors are too large for a 64-bit size ({_largest_size(config)}); "
            "make them smaller") from None
    dataset = source_of(config.data).resident_bytes(config.data)
    configured = configured_split(config, devices)

    splits = []
    for model_ranks in _divisors(devices):
        data_ranks = devices // model_ranks
        rows = -(-batch // data_ranks)
        figures = capacity.per_rank(data_ranks, model_ranks, rows)
        reasons = list(figures.reasons)
        if batch % data_ranks:
            reasons.append(f"data does not divide batch ({batch})")
        bf16_copy = 2 * figures.local_parameters if config.precision == "bf16" else 0
        memory = (figures.weights + figures.gradients + figures.optimizer + figures.activations
                  + dataset + bf16_copy)
        splits.append(Split(
            data=data_ranks, model=model_ranks, valid=not reasons, reason="; ".join(reasons),
            rows_per_rank=rows, local_parameters=figures.local_parameters,
            weights=figures.weights, gradients=figures.gradients, optimizer=figures.optimizer,
            activations=figures.activations, dataset=dataset, bf16_copy=bf16_copy,
            total=memory, fits=not reasons and memory <= device_memory * headroom,
            model_axis_sent=figures.model_axis_sent, data_axis_sent=figures.data_axis_sent,
            sent=figures.model_axis_sent + figures.data_axis_sent,
            configured=configured == (data_ranks, model_ranks),
        ))
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    if dataset_size is not None and dataset_size < 1:
        raise ConfigError(f"--dataset-size must be at least 1, got {dataset_size}")
    epoch_rows = dataset_size or train_rows
    if profile is not None and capacity.work is not None:
        _forecast(splits, capacity, profile, config, batch, gpus_per_node, epoch_rows)
    fitting = [s for s in splits if s.fits]
    if fitting and profile is not None and capacity.work is not None:
        min(fitting, key=lambda s: (s.step_time_s, s.sent, s.total)).recommended = True
    elif fitting:
        min(fitting, key=lambda s: (s.sent, s.total)).recommended = True

    plan = Plan(
        experiment=config.name, model=capacity.description, inputs=math.prod(shape),
        hidden=capacity.hidden, parameters=capacity.parameters,
        parameter_table=capacity.parameter_table, batch=batch, train_rows=train_rows,
        optimizer=config.optimizer.name, evaluations_per_step=capacity.evaluations_per_step,
        devices=devices, device_memory=device_memory, headroom=headroom, splits=splits,
        layers=capacity.layers, profile=profile.name if profile is not None else None,
        gpus_per_node=gpus_per_node or (profile.gpus_per_node if profile is not None else None),
        dataset_size=epoch_rows,
    )
    if not fitting and find_savings:
        plan.fits_with = _fits_with(config, devices, device_memory, batch, headroom)
    plan.notes = _notes(plan, config, capacity.notes)
    return plan


def _fits_with(config: ExperimentConfig, devices: int, device_memory: int, batch: int,
               headroom: float) -> dict[str, Any] | None:
    """The first of the learner's memory savings, alone then in twos and threes (in the
    learner's order), with which a split fits; None when none does."""
    from itertools import combinations

    from terabrain.config.loader import with_overrides
    from terabrain.learners.registry import learner_of

    options = learner_of(config).memory_savings(config)
    for size in range(1, len(options) + 1):
        for chosen in combinations(options, size):
            settings = [assignment for option in chosen for assignment in option]
            keys = [assignment.partition("=")[0] for assignment in settings]
            if len(set(keys)) != len(keys):  # two choices for one field
                continue
            try:
                changed = with_overrides(config, settings)
            except ConfigError:
                continue
            plan = plan_experiment(changed, devices, device_memory, batch=batch,
                                   headroom=headroom, find_savings=False)
            # The optimizer in the backward pass runs without a data axis.
            fitting = [s for s in plan.splits if s.fits
                       and (s.data == 1 or not changed.train.optimizer_in_backward)]
            best = plan.recommended if plan.recommended in fitting else (
                min(fitting, key=lambda s: (s.sent, s.total)) if fitting else None)
            if best is not None:
                return {"settings": settings, "split": asdict(best)}
    return None


def _arithmetic(split: dict[str, Any], usable: int) -> str:
    """One split's memory per rank as a sum, e.g. for the plan's notes."""
    parts = " + ".join(f"{name} {format_bytes(split[key])}" for name, key in (
        ("weights", "weights"), ("grads", "gradients"), ("optim", "optimizer"),
        ("activ", "activations")))
    other = split["dataset"] + split["bf16_copy"]
    return f"{parts} + other {format_bytes(other)} = {format_bytes(split['total'])} <= {format_bytes(usable)}"


def _forecast(splits: list[Split], capacity: Capacity, profile: "MachineProfile",
              config: "ExperimentConfig", batch: int, gpus_per_node: Optional[int],
              epoch_rows: Optional[int]) -> None:
    """Fill in every valid split's step time from the learner's work and the profile."""
    from terabrain.capacity.timing import predict
    from terabrain.data.sources import source_of

    reading = source_of(config.data).reading(config.data)
    for split in splits:
        if not split.valid:
            continue
        work = capacity.work(split.data, split.model, split.rows_per_rank)
        time = predict(profile, work, split.data, split.model, gpus_per_node=gpus_per_node,
                       reading=reading, bf16=config.precision == "bf16")
        split.step_time_s, split.compute_s = time.step_s, time.compute_s
        split.communication_s, split.exposed_s, split.read_s = (
            time.communication_s, time.exposed_s, time.read_s)
        split.images_per_s = time.images_per_s(batch)
        if epoch_rows is not None:
            split.epoch_s = epoch_rows / split.images_per_s


def _notes(plan: Plan, config: "ExperimentConfig", learner_notes: list[str]) -> list[str]:
    notes = []
    best = plan.recommended
    if best is not None and best.step_time_s is not None:
        notes.append(
            f"recommended: parallel.data={best.data} parallel.model={best.model} "
            f"(fits, fastest on {plan.profile}: {format_seconds(best.step_time_s)} per step, "
            f"{best.images_per_s:,.0f} images/s)"
        )
    elif best is not None:
        notes.append(
            f"recommended: parallel.data={best.data} parallel.model={best.model} "
            f"(fits, sends the least: {format_bytes(best.sent)} per rank per step)"
        )
    if best is not None:
        momentum = (f" momentum {config.optimizer.momentum:g}"
                    if config.optimizer.name in ("sgd", "rmsprop") else "")
        notes.append(
            f"as configured (precision {config.precision}, optimizer {config.optimizer.name}"
            f"{momentum}): " + _arithmetic(asdict(best), plan.usable_memory) + " per rank"
        )
    else:
        valid = [s for s in plan.splits if s.valid]
        smallest = min(valid, key=lambda s: s.total) if valid else None
        needs = f"; the smallest valid split needs {format_bytes(smallest.total)} per rank" if smallest else ""
        if plan.fits_with is not None:
            split = plan.fits_with["split"]
            notes.append(
                f"no split fits in {format_bytes(plan.usable_memory)} per device as configured"
                f"{needs}; it fits with " + " ".join(f"--set {s}" for s in plan.fits_with["settings"])
                + f", on parallel.data={split['data']} parallel.model={split['model']}: "
                + _arithmetic(split, plan.usable_memory) + " per rank"
            )
        else:
            notes.append(
                f"no split fits in {format_bytes(plan.usable_memory)} per device{needs}, nor with "
                "the learner's memory savings: use more devices or more memory per device"
            )
    if next((s for s in plan.splits if s.configured), None) is None:
        notes.append(
            f"the experiment's parallel section (data={config.parallel.data}, "
            f"model={config.parallel.model}) does not fit {plan.devices} ranks; "
            "set parallel.model/parallel.data to a row above"
        )
    if config.supervised is not None:
        notes.append("only the feature-learning stage is planned, not the supervised one")
    if config.optimizer.name == "lbfgs":
        notes.append(
            f"lbfgs: {2 * config.optimizer.history_size + 3} flat vectors over all "
            f"{format_count(plan.parameters)} parameters are replicated on every rank, "
            f"model parallelism does not shrink them; figures per step are "
            f"{plan.evaluations_per_step} closure evaluations"
        )
    notes += learner_notes + [
        "weights: fp32 (weights and grads bf16 with precision bf16-weights), Shard placements "
        "/ model, Replicate full; optim (fp32): sgd 0 (1x with momentum), adam 2x, rmsprop 1x "
        "(+1x), adagrad 1x, lbfgs replicated flat vectors",
        "other: the training set when the trainer keeps it on every rank's device (in-memory "
        "sources; streamed ones hold only their prefetch buffers), + autocast's bf16 weight copy",
        "sent:data: one ring all-reduce of the local gradients, 2(d-1)/d x local parameters x 4 B",
        "not counted: the export (model.safetensors) streams the shards to rank 0 in "
        "pieces of 64 MB; checkpoints save straight from the parameters and optimizer state",
    ]
    if plan.profile is not None:
        notes += [
            f"step: predicted seconds per step on profile {plan.profile} "
            f"({plan.gpus_per_node} ranks per node) = compute + exposed communication "
            "(+ reading where it is not hidden); comm: all collectives, alpha-beta per link; "
            "exposed: the part not overlapped with compute. The data-parallel all-reduce runs "
            "during the backward pass (parallel.overlap), hidden behind the weight-gradient "
            "products, its CPU share counted as compute on CPU nodes; with "
            "parallel.overlap=false it starts after the backward pass and is all exposed",
            "epoch: " + (f"{plan.dataset_size:,} examples / images per second"
                         if plan.dataset_size else "give --dataset-size (the source is streamed)"),
        ]
    return notes


# --- output -------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    """The human-readable report: the parameter count, then one row per split."""
    weights_total = format_bytes(FP32 * plan.parameters)
    lines = [
        f"{format_count(plan.parameters)} parameters ({plan.parameters:,}; "
        f"fp32 weights {weights_total})",
        f"{plan.experiment}: {plan.model}, batch {plan.batch}, {plan.optimizer}",
        f"{plan.devices} devices x {format_bytes(plan.device_memory)}, usable "
        f"{format_bytes(plan.usable_memory)} each (headroom {plan.headroom:g}); "
        "per rank, decimal units, sent = bytes each rank sends per step",
        "",
    ]
    if plan.layers:
        lines.append("layer  kind   input -> codes -> output            parameters  GFLOP/example")
        for row in plan.layers:
            shapes = " -> ".join("x".join(map(str, row[k])) for k in ("input", "codes", "output"))
            lines.append(
                f"{row['layer']:>5}  {row['kind']:<5}  {shapes:<32}  "
                f"{format_count(row['parameters']):>10}  {row['forward_flops_per_example'] / 1e9:>13.2f}"
            )
        lines.append("")
    timed = plan.profile is not None
    header = ["data", "model", "weights", "grads", "optim", "activ", "other", "total",
              "fits", "sent:model", "sent:data", "sent"]
    if timed:
        header += ["step", "compute", "comm", "exposed", "images/s", "epoch"]
    header.append("")
    rows = []
    for s in plan.splits:
        marks = []
        if s.recommended:
            marks.append("<- recommended")
        if s.configured:
            marks.append("(config)")
        row = [
            str(s.data), str(s.model), format_bytes(s.weights), format_bytes(s.gradients),
            format_bytes(s.optimizer), format_bytes(s.activations), format_bytes(s.other),
            format_bytes(s.total), s.status, format_bytes(s.model_axis_sent),
            format_bytes(s.data_axis_sent), format_bytes(s.sent),
        ]
        if timed:
            row += ([format_seconds(s.step_time_s), format_seconds(s.compute_s),
                     format_seconds(s.communication_s), format_seconds(s.exposed_s),
                     f"{s.images_per_s:,.0f}",
                     format_seconds(s.epoch_s) if s.epoch_s is not None else "-"]
                    if s.step_time_s is not None else ["-"] * 6)
        rows.append(row + [" ".join(marks)])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    left = {8, len(header) - 1}  # fits, marks

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines.append(line(header))
    lines += [line(r) for r in rows]
    lines.append("")
    for note in plan.notes:  # wrapped, never between a number and its unit
        glued = re.sub(r"(\d) (B|kB|MB|GB|TB)\b", "\\1\0\\2", note)
        wrapped = textwrap.fill(glued, 100, initial_indent="- ", subsequent_indent="  ")
        lines.append(wrapped.replace("\0", " "))
    return "\n".join(lines)
