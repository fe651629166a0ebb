"""Before a run allocates anything: does the experiment fit this machine's memory?

An experiment whose model or data set cannot fit (``model.hidden=10000000000000``) would
otherwise end in an allocator traceback, or worse, in the kernel's OOM killer after minutes of
swapping. The planner (terabrain.capacity.planner) already estimates the memory per rank
without allocating; this check compares the configured split's estimate, times the ranks on
this machine, with the machine's memory (RAM for CPU ranks, device memory for GPU ranks).

The message names the fields that make the experiment too large: each integer field of the
``model`` and ``data`` sections (and ``train.batch_size``) is halved in turn and the estimate
made again; the fields whose halving shrinks it by more than a quarter are the ones to change.

Only clear cases are refused: the estimate must exceed the whole memory, not a fraction of it.

The in-memory data set has its own, stricter limit (``check_data_fits_memory``): every rank
on this machine holds its own copy of the training rows, and together they may take at most
``DATA_MEMORY_FRACTION`` of RAM; above that the message names the data fields that set the
size and points to streaming.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from terabrain.errors import ConfigError
from terabrain.units import format_bytes

if TYPE_CHECKING:
    from terabrain.config.schema import ExperimentConfig

_SHRINKS = 0.75
DATA_MEMORY_FRACTION = 0.5
"""The share of this machine's RAM the in-memory training sets of its ranks may take: the
rest is for the model, its gradients and optimizer state, and the batches."""


def machine_memory(device: str) -> tuple[int, str]:
    """(bytes, what) for one rank's device: a GPU's memory, or this machine's RAM."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"


def estimated_bytes(config: ExperimentConfig, ranks: int) -> int | None:
    """Memory per rank of the configured split, or None when the planner cannot say (a
    streamed collection without a batch size, a split the ranks do not make)."""
    from terabrain.capacity.planner import UnaddressableModel, plan_experiment

    try:
        plan = plan_experiment(config, ranks, 1, find_savings=False)
    except UnaddressableModel:
        raise
    except (ConfigError, ValueError, ArithmeticError, OverflowError):
        return None
    chosen = [s for s in plan.splits if s.configured] or (plan.splits if ranks == 1 else [])
    return chosen[0].total if chosen else None


def _halved(config: ExperimentConfig, section: str, name: str) -> ExperimentConfig | None:
    raw = config.model_dump(mode="json")
    value = raw[section][name]
    raw[section][name] = value // 2
    try:
        return type(config).model_validate(raw)
    except ValueError:  # pydantic's ValidationError: the halved value breaks a rule
        return None


def driving_fields(config: ExperimentConfig, ranks: int, total: int) -> list[str]:
    """``section.field=value`` for the integer fields whose halving shrinks the estimate."""
    from terabrain.capacity.planner import integer_fields

    found: list[tuple[float, str]] = []
    candidates = [(section, name, value)
                  for section, name, value in integer_fields(config, ("model", "data", "train"))
                  if value >= 2 and (section != "train" or name == "batch_size")]
    for section, name, value in candidates:
        smaller = _halved(config, section, name)
        estimate = estimated_bytes(smaller, ranks) if smaller is not None else None
        if estimate is not None and estimate < _SHRINKS * total:
            found.append((estimate / total, f"{section}.{name}={value}"))
    return [text for _, text in sorted(found)[:3]]


def check_fits_this_machine(config: ExperimentConfig, ranks: int, ranks_here: int) -> None:
    """ConfigError (one line, naming the fields) when the experiment's estimate for this
    machine's ``ranks_here`` ranks (of ``ranks``) exceeds its memory."""
    per_rank = estimated_bytes(config, ranks)
    if per_rank is None:
        return
    memory, what = machine_memory(config.device)
    here = per_rank if what == "GPU memory" else per_rank * ranks_here
    if here <= memory:
        return
    fields = driving_fields(config, ranks, per_rank)
    cause = (f"set by {', '.join(fields)}" if fields
             else "set by the model and data sections")
    where = f"{ranks_here} ranks here" if ranks_here > 1 and what == "memory" else "one rank"
    raise ConfigError(
        f"the experiment needs about {format_bytes(here)} ({where}), more than this machine's "
        f"{format_bytes(memory)} of {what}; {cause}. Make them smaller, or see "
        "`terabrain plan` for splits over more devices")


def _resident(config: ExperimentConfig) -> int:
    from terabrain.data.sources import source_of

    try:
        return source_of(config.data).resident_bytes(config.data)
    except (ConfigError, ValueError, ArithmeticError, OverflowError, NotImplementedError):
        return 0


def check_data_fits_memory(config: ExperimentConfig, ranks_here: int,
                           memory: int | None = None) -> None:
    """ConfigError (one line, naming the data fields that set the size) when the training
    rows the ``ranks_here`` ranks of this machine each hold in memory would take more than
    ``DATA_MEMORY_FRACTION`` of its RAM (``memory``; default: this machine's)."""
    per_rank = _resident(config)
    memory = memory if memory is not None else machine_memory("cpu")[0]
    if per_rank * ranks_here <= DATA_MEMORY_FRACTION * memory:
        return
    fields = []
    for name, value in config.data.model_dump().items():
        if type(value) is int and value >= 2:
            smaller = _halved(config, "data", name)
            if smaller is not None and _resident(smaller) < _SHRINKS * per_rank:
                fields.append(f"data.{name}={value}")
    named = ", ".join(fields) if fields else f"data.source {config.data.source}"
    where = f" per rank, {format_bytes(per_rank * ranks_here)} for the {ranks_here} ranks here" \
        if ranks_here > 1 else ""
    raise ConfigError(
        f"{named}: the training set held in memory needs {format_bytes(per_rank)}{where}, more "
        f"than {DATA_MEMORY_FRACTION:.0%} of this machine's {format_bytes(memory)} of memory; "
        "make it smaller or stream it (data.source shards, folder or yfcc with data.stream true)")
