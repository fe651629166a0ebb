"""Build a training stage's :class:`Trainer` from configuration: the one place that turns
config sections into a trainer, used alike by ``run.py``, the tests and the benchmarks.

Two entry points:

- :func:`feature_trainer` asks the experiment's learner (terabrain.learners) for the network,
  its placement on the mesh, the objective, the parameters to optimise and the optional
  layer-wise schedule, and builds the trainer of the feature-learning stage.
- :func:`build_trainer` is the lower layer for a stage whose model is already built (the
  supervised head, or a hand-built module in a test): it takes the ``train`` and ``optimizer``
  sections and wires steps, batch size, seed, precision and logging cadence.

Run-directory concerns (metrics, TensorBoard, checkpoints) are callbacks chosen by the
caller; :func:`run_callbacks` gives the standard set in the order run.py relies on.
:func:`fit_stage` continues a stage from its newest checkpoint and trains it to the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from terabrain.config.schema import ExperimentConfig, OptimizerConfig, TrainConfig
from terabrain.hooks import Callback
from terabrain.learners.base import Learner, Training
from terabrain.learners.registry import learner_of
from terabrain.parallel.communication_log import communication_callbacks
from terabrain.parallel.launch import is_main_rank
from terabrain.parallel.parallelism import Parallelism
from terabrain.train import callbacks as cb
from terabrain.train.checkpoint import CheckpointManager, restore
from terabrain.train.hogwild import fit_hogwild
from terabrain.train.malloc import apply_buffer_policy
from terabrain.train.optim import build_optimizer
from terabrain.train.preemption import PreemptionStop
from terabrain.train.trainer import BatchSource, Trainer

CPU = torch.device("cpu")


def build_trainer(
    model: torch.nn.Module,
    objective: Any,
    *,
    optimizer: OptimizerConfig | torch.optim.Optimizer,
    train: TrainConfig,
    seed: int,
    precision: str = "fp32",
    parameters: Iterable[torch.nn.Parameter] | None = None,
    inputs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    batches: BatchSource | None = None,
    parallel: Parallelism | None = None,
    device: torch.device = CPU,
    callbacks: Sequence[Callback] = (),
    steps: int | None = None,
) -> Trainer:
    """A trainer for ``model`` from the stage's ``train`` section and the ``optimizer``
    section (or an optimizer already built). ``parameters``: what the optimizer updates
    (default: every parameter of ``model`` that requires a gradient). ``steps`` overrides
    ``train.steps`` (a layer-wise schedule decides its own budget)."""
    if isinstance(optimizer, OptimizerConfig):
        optimizer = build_optimizer(
            optimizer, model.parameters() if parameters is None else parameters,
            precision=precision, seed=seed,
        )
    return Trainer(
        model, objective, optimizer, inputs, targets,
        steps=train.steps if steps is None else steps,
        batch_size=train.batch_size, seed=seed, device=device, precision=precision,
        optimizer_in_backward=train.optimizer_in_backward,
        log_every=train.log_every, callbacks=callbacks, parallel=parallel, batches=batches,
    )


@dataclass
class FeatureStage:
    """The feature-learning stage as built from a config: the learner, its (placed) network,
    what the trainer steps (``training``) and the trainer itself."""

    learner: Learner
    network: torch.nn.Module
    training: Training
    trainer: Trainer
    fitted: dict[str, Any]
    """What the learner's data-dependent initialisation recorded (Learner.fit_to_data)."""


def feature_trainer(
    config: ExperimentConfig,
    example_shape: tuple[int, ...],
    *,
    inputs: torch.Tensor | None = None,
    batches: BatchSource | None = None,
    parallel: Parallelism | None = None,
    device: torch.device = CPU,
    callbacks: Callable[[Training], Sequence[Callback]] | None = None,
    network: torch.nn.Module | None = None,
    sample: torch.Tensor | None = None,
) -> FeatureStage:
    """The feature-learning stage of ``config`` on examples of ``example_shape``: from
    ``inputs`` (in memory) or ``batches`` (a streamed collection).

    ``callbacks(training)`` returns the trainer's callbacks; it sees the learner's training
    view so that it can place a layer-wise schedule and draw filters. By default the stage
    stops early as ``config.train.early_stopping`` says, or follows the schedule.
    ``network``: an already materialized network (default: the learner builds one from
    ``config.seed`` and places it on ``parallel``). ``sample``: training rows, the same on
    every rank, for the learner's data-dependent initialisation (default: ``inputs``); a
    resumed run loads its checkpoint over that start."""
    parallel = parallel or Parallelism(None)
    learner = learner_of(config)
    learner.check_parallel(config, parallel)
    if network is None:
        network = learner.materialize(config, example_shape, parallel, device)
    if config.precision == "bf16-weights":  # stored in bf16 from here on (checkpoints too)
        network = network.to(torch.bfloat16)
    rows = sample if sample is not None else inputs
    fitted = learner.fit_to_data(config, network, rows) if rows is not None else {}
    training = learner.training(config, network, parallel, example_shape)
    chosen = callbacks(training) if callbacks is not None else [stopping(config.train, training)]
    # A learner not trained by gradient descent (k-means) brings its own update rule.
    optimizer = (training.optimizer(training.parameters) if training.optimizer is not None
                 else config.optimizer)
    trainer = build_trainer(
        training.model, training.objective, optimizer=optimizer,
        parameters=training.parameters, train=config.train, seed=config.seed,
        precision=config.precision, inputs=inputs, batches=batches, parallel=parallel,
        device=device, callbacks=chosen,
        steps=training.schedule.total_budget if training.schedule is not None else None,
    )
    return FeatureStage(learner, network, training, trainer, fitted)


def stopping(train: TrainConfig, training: Training | None = None) -> Callback:
    """The stage's stopping rule: a layer-wise schedule stops each layer on its own;
    otherwise early stopping on the stage's loss."""
    if training is not None and training.schedule is not None:
        return training.schedule
    return cb.EarlyStopping(train.early_stopping.patience, train.early_stopping.min_delta)


def run_callbacks(
    *,
    stage: str,
    run_dir: Path,
    manager: CheckpointManager,
    train: TrainConfig,
    config: ExperimentConfig,
    parallel: Parallelism,
    training: Training | None = None,
) -> list[Callback]:
    """The callbacks of a stage trained in a run directory, in the order they must run:
    communication accounting, logging (main rank only), the NaN guard (before anything
    records a diverged step), the stopping rule, checkpointing (which saves the stopping
    rule's state as of this step), and last the pre-emption stop (on a signal every rank
    agrees on this step, saves it unless just saved, and stops)."""
    filter_image = training.filter_image if training is not None else None
    loggers = [
        cb.MetricsLogger(run_dir / "metrics.jsonl", stage),
        cb.TensorBoardLogger(run_dir / "tb", stage, train.histogram_every, filter_image),
        cb.ProgressBar(stage, train.progress),
    ]
    checkpointing = cb.Checkpointing(manager, train.checkpoint_every)
    return (
        communication_callbacks(parallel, config.parallel)
        + (loggers if is_main_rank() else [])
        + [cb.NaNGuard(manager), stopping(train, training), checkpointing,
           PreemptionStop(checkpointing)]  # a signal: every rank saves this step and stops
    )


def fit_stage(trainer: Trainer, stage: str, manager: CheckpointManager,
              config: ExperimentConfig, release_freed_buffers: str = "auto") -> None:
    """Continue from the stage's newest checkpoint, if any, and train to the end. Freed
    batch-sized tensors leave the resident set (a large model) or are kept for the next step
    (``release_freed_buffers``, the stage's own train setting: terabrain/train/malloc.py)."""
    apply_buffer_policy(release_freed_buffers, trainer.model)
    latest, skipped = manager.restorable()  # the newest checkpoint that verifies
    if skipped and is_main_rank():
        print(f"[{stage}] {skipped}")
    if latest is not None:
        restore(latest, trainer)
        if is_main_rank():
            print(f"[{stage}] resuming from {latest} (step {trainer.step})")
    if config.parallel.mode == "hogwild":
        fit_hogwild(trainer, config.parallel.workers)
    else:
        trainer.fit()
    if trainer.stop_reason and is_main_rank():
        print(f"[{stage}] {trainer.stop_reason}")


def last_metrics(run_dir: Path, stage: str) -> dict[str, Any]:
    """The last metrics.jsonl line of ``stage`` (empty when it logged none)."""
    last: dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") == stage:
                last = record
    return last
