"""How an experiment would split over N devices: memory per rank and bytes sent per step,
for every (data x model) mesh of N ranks, without allocating the model.

The model is built on the meta device (shapes only, no storage), so planning a 78.6-billion-
parameter autoencoder takes milliseconds. Each parameter is placed on the model axis as
``terabrain.parallel.plans.hidden_unit_plan`` places it (``Shard`` -> 1/model of it per rank,
``Replicate`` -> all of it). Everything is fp32 (4 bytes): weights stay fp32 under bf16 too.

Per rank, with b = batch / data rows, n inputs, h hidden units, m = model, d = data, and
``local`` the rank's parameter elements (sharded ones / m + replicated ones). The total is
the sum of the columns, an upper bound of the peak (checked against
``torch.distributed._tools.MemTracker`` on real steps in tests/test_plan.py):

- weights: 4 local bytes.
- gradients: the working set at the peak of the backward pass, not just ``.grad``: a weight
  that appears k times in the graph gets k partial gradients, summed. Measured: a tied
  autoencoder's W 3x (encoder, decoder, and the weight-decay term, which the objective
  evaluates even when objective.weight_decay is 0), an untied one's two matrices 2x each,
  RICA's W 5x (its row-normalised copy takes part too); biases 1x. The data-parallel flat
  copy of the gradients (``DataParallel.average_``) and the optimizers' step temporaries come
  after the backward pass, when only 1x remains, and never exceed this.
- optimizer state: sgd 0 (momentum 0) or 1x local (momentum buffer); adam, adamw 2x;
  rmsprop 1x (+1x with momentum); adagrad 1x. lbfgs keeps its curvature history as flat
  vectors over *all* parameters, and under DTensor these are REPLICATED, not sharded:
  2 * history_size + 3 full-size vectors (old_dirs, old_stps, d, flat_grad, prev_flat_grad)
  on every rank, plus 3 more and a copy of the local weights during a strong-Wolfe line
  search. Model parallelism therefore does not shrink L-BFGS's memory.
- activations: 4 * b * (3 h/m + 5 n) bytes: the input batch, the residual saved for the
  backward, its reduced copy, its square and the reconstruction's gradient (5 n per row),
  the codes, their gradient and the pre-activation gradient (3 h/m per row); +2 n with input
  dropout (mask and dropped copy), +n with a sigmoid decoder (its output is saved).
- other: the whole training set, which the trainer keeps on every rank's device
  (rows * n * 4 bytes), and with bf16 autocast's bf16 copy of the local weights (2 local bytes).

Bytes each rank sends per closure evaluation (ring collectives: an all-reduce of S bytes
over k ranks sends 2 (k-1)/k * S per rank, an all-gather of a tensor of S bytes (k-1)/k * S):

- model axis: the reconstruction is a partial sum over hidden units, all-reduced:
  2 (m-1)/m * b * n * 4, in the forward pass, as it leaves the model (the plan makes partial
  outputs whole there). The backward pass needs nothing more: the residual's gradient is
  replicated, so the gradients of the sharded codes and weights are local products. Sums
  over hidden units add
  scalars: one for an autoencoder's loss (weight decay and KL), b + 1 for RICA (each row's
  L1, and the gradient of its replicated alpha). L-BFGS also all-gathers the sharded
  gradient into its replicated flat vector: (m-1)/m * 4 * (sharded elements).
  tests/test_plan.py checks all of this against the collectives DTensor actually issues.
- data axis: one all-reduce of the local gradient shard and the logged values,
  2 (d-1)/d * 4 * (local + values) (``terabrain.parallel.data_parallel``).

SGD, Adam and the others evaluate the closure once per step; L-BFGS about max_iter + 1 times
(max_iter without line search), so its per-step figures are that many evaluations.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from terabrain.config.schema import DataConfig, ExperimentConfig
from terabrain.errors import ConfigError

FP32 = 4
DEFAULT_HEADROOM = 0.9
RECONSTRUCTION_ALL_REDUCES = 1  # forward only: the plan makes the reconstruction whole

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*$")


def parse_memory(text: str, option: str = "--gpu-memory") -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, ``1.5TB`` ... -> bytes."""
    match = _MEMORY.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{option}: expected a size with a unit, such as 80GB, 80GiB or 512MB "
            f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{option}: must be more than 0 bytes, got {text!r}")
    return value


def format_bytes(count: float) -> str:
    """Decimal units, three significant digits: 39.3 GB, 55.1 MB, 0 B."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        count /= 1000.0
        if count < 999.5 or unit == "PB":
            digits = 2 if count < 9.995 else (1 if count < 99.95 else 0)
            return f"{count:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    """9830646608 -> '9.83 B', 3149824 -> '3.15 M'."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {suffix}"
    return str(count)


# --- what the experiment is ---------------------------------------------------------------


def data_shape(data: DataConfig) -> tuple[int, int]:
    """(inputs per example, training rows), from the config alone: no photo is loaded."""
    if data.source == "photos":
        return data.patch_size * data.patch_size * (3 if data.color else 1), data.num_patches
    if data.source == "face_mix":  # grey
        return data.patch_size * data.patch_size, data.num_patches
    if data.source == "digits":
        rows, inputs = 1797, 64  # scikit-learn's digits
    else:
        import numpy as np

        try:
            array = np.load(data.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ConfigError(f"data.path: cannot read {data.path} as .npy: {error}") from None
        rows, inputs = array.shape[0], int(np.prod(array.shape[1:]))
    test = max(1, int(round(rows * data.test_fraction)))
    return inputs, rows - test


@dataclass
class ParameterInfo:
    name: str
    shape: list[int]
    numel: int
    placement: str
    """Placement on the model axis: ``Shard(0)``, ``Shard(1)`` or ``Replicate()``."""
    gradient_copies: int
    """Gradient-sized tensors alive at the peak of the backward pass (module docstring)."""

    @property
    def sharded(self) -> bool:
        return self.placement.startswith("Shard")


def parameters_of(config: ExperimentConfig, inputs: int) -> list[ParameterInfo]:
    """Every parameter of the feature learner with its model-axis placement, from a model
    built on the meta device (no memory is allocated, whatever its size)."""
    from terabrain.nn.autoencoder import build_model
    from terabrain.parallel.hidden_unit_plan import hidden_unit_plan

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # leave the RNG as it was
        model = build_model(config.model, inputs)
    plan = hidden_unit_plan(model)
    return [
        ParameterInfo(
            name, list(p.shape), p.numel(), repr(plan[name]),
            _gradient_copies(model, name, config.objective.weight_decay > 0),
        )
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


def _gradient_copies(model: torch.nn.Module, name: str, weight_decay: bool) -> int:
    """A weight used k times in the graph has k partial gradients and their sum alive at
    once (measured with MemTracker; see the module docstring). The weight-decay term, when
    on, is one more use."""
    from terabrain.nn.autoencoder import RICA, Autoencoder

    if isinstance(model, RICA) and name == "weight":
        return 5
    if isinstance(model, Autoencoder) and name == "encoder.weight":
        return (3 if model.tied else 2) + weight_decay
    if isinstance(model, Autoencoder) and name == "decoder.weight":
        return 2 + weight_decay
    return 1


# --- the plan -----------------------------------------------------------------------------


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
    parameter_table: list[ParameterInfo]
    batch: int
    train_rows: int
    optimizer: str
    evaluations_per_step: int
    devices: int
    device_memory: int
    headroom: float
    splits: list[Split]
    notes: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    """model.kind deep: one row per layer (terabrain.plan_deep.layer_table)."""

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
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _optimizer_state(config: ExperimentConfig, local: int, total_parameters: int) -> int:
    """Elements of optimizer state per rank (see the module docstring)."""
    opt = config.optimizer
    if opt.name == "sgd":
        return local if opt.momentum > 0 else 0
    if opt.name in ("adam", "adamw"):
        return 2 * local
    if opt.name == "rmsprop":
        return local * (2 if opt.momentum > 0 else 1)
    if opt.name == "adagrad":
        return local
    # lbfgs: replicated flat vectors over all parameters.
    flat = 2 * opt.history_size + 3
    if opt.line_search == "strong_wolfe":
        return (flat + 3) * total_parameters + local
    return flat * total_parameters


def _evaluations_per_step(config: ExperimentConfig) -> int:
    opt = config.optimizer
    if opt.name != "lbfgs":
        return 1
    return opt.max_iter + (1 if opt.line_search == "strong_wolfe" else 0)


def _logged_values(config: ExperimentConfig) -> int:
    """The loss and its named parts, averaged with the gradients across replicas."""
    return {"rica": 3, "sparse_autoencoder": 4, "reconstruction": 3}[config.objective.kind]


def _ring_all_reduce(ranks: int, payload: float) -> float:
    return 2.0 * (ranks - 1) / ranks * payload if ranks > 1 else 0.0


def _ring_all_gather(ranks: int, payload: float) -> float:
    return (ranks - 1) / ranks * payload if ranks > 1 else 0.0


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def configured_split(config: ExperimentConfig, devices: int) -> Optional[tuple[int, int]]:
    """The (data, model) the experiment's `parallel` section gives on ``devices`` ranks."""
    data, model = config.parallel.data, config.parallel.model
    if data == -1 and model >= 1 and devices % model == 0:
        data = devices // model
    elif model == -1 and data >= 1 and devices % data == 0:
        model = devices // data
    return (data, model) if data >= 1 and model >= 1 and data * model == devices else None


def plan_experiment(
    config: ExperimentConfig,
    devices: int,
    device_memory: int,
    *,
    batch: Optional[int] = None,
    headroom: float = DEFAULT_HEADROOM,
) -> Plan:
    """Memory per rank and bytes sent per step for every (data, model) with data * model =
    ``devices``; marks the ones that fit in ``headroom * device_memory`` and recommends the
    one that fits and sends the fewest bytes."""
    if devices < 1:
        raise ConfigError(f"--gpus must be at least 1, got {devices}")
    if device_memory <= 0:
        raise ConfigError(f"--gpu-memory must be more than 0 bytes, got {device_memory}")
    if not 0 < headroom <= 1:
        raise ConfigError(f"--headroom must be in (0, 1], got {headroom}")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")

    if config.model.kind == "deep":
        from terabrain.plan_deep import plan_deep

        return plan_deep(config, devices, device_memory, batch, headroom)
    inputs, train_rows = data_shape(config.data)
    params = parameters_of(config, inputs)
    total = sum(p.numel for p in params)
    sharded = sum(p.numel for p in params if p.sharded)
    hidden = config.model.hidden
    if batch is None:
        batch = min(config.train.batch_size or train_rows, train_rows)
    evaluations = _evaluations_per_step(config)
    n = inputs
    configured = configured_split(config, devices)

    splits = []
    for model_ranks in _divisors(devices):
        data_ranks = devices // model_ranks
        reasons = []
        if hidden % model_ranks:
            reasons.append(f"model does not divide hidden ({hidden})")
        if batch % data_ranks:
            reasons.append(f"data does not divide batch ({batch})")
        rows = -(-batch // data_ranks)
        local_of = {p.name: -(-p.numel // model_ranks) if p.sharded else p.numel for p in params}
        local = sum(local_of.values())
        gradient_elements = sum(p.gradient_copies * local_of[p.name] for p in params)
        h_local = -(-hidden // model_ranks)

        act_per_row = 3 * h_local + 5 * n
        if config.model.dropout > 0:
            act_per_row += 2 * n
        if config.model.kind == "autoencoder" and config.model.decoder_activation == "sigmoid":
            act_per_row += n
        activations = FP32 * rows * act_per_row
        bf16_copy = 2 * local if config.precision == "bf16" else 0
        weights = FP32 * local
        gradients = FP32 * gradient_elements
        optimizer = FP32 * _optimizer_state(config, local, total)
        dataset = FP32 * train_rows * n
        memory = weights + gradients + optimizer + activations + dataset + bf16_copy

        # Sums over hidden units, as DTensor issues them: an autoencoder's loss reduces one
        # scalar (its weight decay and KL sums meet in it); RICA reduces each row's L1 and
        # the gradient of its replicated scale alpha.
        # Sums over hidden units: RICA's per-row L1 and alpha's gradient; an autoencoder's
        # weight decay and KL terms (none without them).
        autoencoder_sums = int(config.objective.weight_decay > 0) or int(
            config.objective.kind == "sparse_autoencoder"
        )
        scalars = rows + 1 if config.model.kind == "rica" else autoencoder_sums
        per_eval_model = _ring_all_reduce(
            model_ranks, RECONSTRUCTION_ALL_REDUCES * FP32 * rows * n
        ) + _ring_all_reduce(model_ranks, FP32 * scalars)
        if config.optimizer.name == "lbfgs":
            per_eval_model += _ring_all_gather(model_ranks, FP32 * sharded)
        per_eval_data = _ring_all_reduce(data_ranks, FP32 * (local + _logged_values(config)))
        model_sent = round(evaluations * per_eval_model)
        data_sent = round(evaluations * per_eval_data)
        splits.append(
            Split(
                data=data_ranks, model=model_ranks, valid=not reasons,
                reason="; ".join(reasons), rows_per_rank=rows, local_parameters=local,
                weights=weights, gradients=gradients, optimizer=optimizer,
                activations=activations, dataset=dataset, bf16_copy=bf16_copy, total=memory,
                fits=not reasons and memory <= device_memory * headroom,
                model_axis_sent=model_sent, data_axis_sent=data_sent,
                sent=model_sent + data_sent,
                configured=configured == (data_ranks, model_ranks),
            )
        )
    fitting = [s for s in splits if s.fits]
    if fitting:
        min(fitting, key=lambda s: (s.sent, s.total)).recommended = True

    plan = Plan(
        experiment=config.name, model=_describe_model(config, inputs), inputs=inputs,
        hidden=hidden, parameters=total, parameter_table=params, batch=batch,
        train_rows=train_rows, optimizer=config.optimizer.name,
        evaluations_per_step=evaluations, devices=devices, device_memory=device_memory,
        headroom=headroom, splits=splits,
    )
    plan.notes = _notes(plan, config)
    return plan


def _describe_model(config: ExperimentConfig, inputs: int) -> str:
    m = config.model
    if m.kind == "rica":
        return f"rica {inputs:,} -> {m.hidden:,}"
    return f"autoencoder {inputs:,} -> {m.hidden:,} -> {inputs:,} ({'tied' if m.tied else 'untied'})"


def _notes(plan: Plan, config: ExperimentConfig) -> list[str]:
    notes = []
    best = plan.recommended
    if best is not None:
        notes.append(
            f"recommended: parallel.data={best.data} parallel.model={best.model} "
            f"(fits, sends the least: {format_bytes(best.sent)} per rank per step)"
        )
    else:
        valid = [s for s in plan.splits if s.valid]
        smallest = min(valid, key=lambda s: s.total) if valid else None
        needs = f"; the smallest valid split needs {format_bytes(smallest.total)} per rank" if smallest else ""
        notes.append(
            f"no split fits in {format_bytes(plan.usable_memory)} per device{needs}: "
            "use more devices or more memory per device"
        )
    configured = next((s for s in plan.splits if s.configured), None)
    if configured is None:
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
    notes += [
        "weights: fp32, Shard placements / model, Replicate full; grads: the backward pass's "
        "peak gradient working set (tied W 3x, untied 2x each, RICA 5x, biases 1x); optim: sgd 0 "
        "(1x with momentum), adam 2x, rmsprop 1x (+1x), adagrad 1x, lbfgs replicated flat vectors",
        "activ: 4 B x batch/data x (3 hidden/model + 5 inputs); other: the training set, which "
        "every rank keeps on its device (+ autocast's bf16 weight copy)",
        "sent:model: one ring all-reduce of the (batch/data x inputs) reconstruction per "
        "forward+backward, 2(m-1)/m x rows x inputs x 4 B; sent:data: one ring all-reduce of "
        "the local gradients, "
        "2(d-1)/d x local parameters x 4 B",
        "not counted: at the end of the stage every rank gathers the full weights "
        "(model.safetensors, filters.png), skipped above 2^30 parameters",
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
    header = ["data", "model", "weights", "grads", "optim", "activ", "other", "total",
              "fits", "sent:model", "sent:data", "sent", ""]
    rows = []
    for s in plan.splits:
        marks = []
        if s.recommended:
            marks.append("<- recommended")
        if s.configured:
            marks.append("(config)")
        rows.append([
            str(s.data), str(s.model), format_bytes(s.weights), format_bytes(s.gradients),
            format_bytes(s.optimizer), format_bytes(s.activations), format_bytes(s.other),
            format_bytes(s.total), s.status, format_bytes(s.model_axis_sent),
            format_bytes(s.data_axis_sent), format_bytes(s.sent), " ".join(marks),
        ])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    left = {8, 12}  # fits, marks

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
