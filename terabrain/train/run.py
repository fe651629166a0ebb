"""Run an experiment end to end in a run directory: data, feature learning, optional
supervised stage, exports and pictures. Resuming re-enters the same path; finished stages
are recorded in ``results.json`` and skipped.

Run directory::

    config.yaml            the fully resolved experiment
    whitening.safetensors  the fitted ZCA transform (when whitening is on)
    metrics.jsonl          one JSON object per logged step (field "stage")
    tb/                    TensorBoard events
    checkpoints/           DCP checkpoints of the feature-learning stage (+ ``latest``)
    model.safetensors      final feature-learning weights
    filters.png            the learned filters
    network/               checkpoints/ and model.safetensors of the source network's
                           training (source_network.training)
    supervised/            checkpoints/ and model.safetensors of the supervised stage
    results.json           per-stage summary: losses, filter statistics, test accuracy,
                           and with a source_network the spliced report ("splice")
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from terabrain.analysis.filters import compare_with_random, save_filter_grid
from terabrain.config.loader import to_yaml
from terabrain.config.schema import ExperimentConfig, TrainConfig
from terabrain.data.prepare import PreparedData, prepare_data
from terabrain.errors import ConfigError, TrainingError
from terabrain.files import replace_atomically, write_text_atomically
from terabrain.hooks import Callback
from terabrain.learners.registry import learner_of
from terabrain.nn.autoencoder import SupervisedHead
from terabrain.objectives import build_supervised_objective
from terabrain.parallel.launch import is_main_rank
from terabrain.parallel.parallelism import Parallelism, full
from terabrain.train.checkpoint import CheckpointManager
from terabrain.train.export import WholeWeights, export_weights, load_exported
from terabrain.train.network_stage import (
    downstream_monitors,
    network_stage,
    splice_stage,
)
from terabrain.train.peak_memory import peak_memory_by_rank
from terabrain.train.stage import (
    build_trainer,
    feature_trainer,
    fit_stage,
    last_metrics,
    run_callbacks,
)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available; allowed: auto, cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_run_dir(config: ExperimentConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{config.name}-{stamp}"


class Results:
    """``results.json``: written atomically after each stage; its keys are finished stages."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def done(self, stage: str) -> bool:
        return stage in self.data

    def record(self, stage: str, values: dict[str, Any]) -> None:
        self.data[stage] = values
        if is_main_rank():
            write_text_atomically(self.path, json.dumps(self.data, indent=2) + "\n")


def _check_divisible(train: TrainConfig, rows: int, parallel: Parallelism) -> None:
    global_batch = train.batch_size or rows
    if global_batch % parallel.data_ranks:
        what = "train.batch_size" if train.batch_size else "the number of training examples"
        raise ConfigError(
            f"{what} ({global_batch}) must divide evenly among parallel.data = "
            f"{parallel.data_ranks} replicas"
        )


def _feature_stage(
    config: ExperimentConfig, data: PreparedData, run_dir: Path, device: torch.device,
    results: Results, parallel: Parallelism, monitors: Sequence[Callback] = (),
) -> torch.nn.Module:
    """Feature learning with the experiment's learner (terabrain.learners): the learner
    builds, places and schedules its network; this stage trains, exports and draws it."""
    learner = learner_of(config)
    learner.check_parallel(config, parallel)
    shape = data.example_shape
    if results.done("features"):
        weights = load_exported(run_dir, error=TrainingError)
        try:
            return learner.restore(config, shape, parallel, device, weights)
        except (RuntimeError, KeyError, ValueError) as error:
            raise TrainingError(f"{run_dir}/model.safetensors does not fit config.yaml: "
                                f"{(str(error).splitlines() or ['?'])[0][:200]}") from None
    started = time.perf_counter()
    train = config.train
    manager = CheckpointManager(run_dir / "checkpoints", keep=train.keep_checkpoints)
    # A streamed collection: this rank's batches come from its own reader (checks its sizes).
    batches = data.stream.open(train.batch_size, parallel, device) if data.stream is not None else None
    _check_divisible(train, len(data.train_x) if data.train_x is not None else 0, parallel)
    stage = feature_trainer(
        config, shape, inputs=data.train_x, batches=batches, parallel=parallel, device=device,
        sample=data.holdout_x if data.train_x is None else None,
        callbacks=lambda training: [*monitors, *run_callbacks(  # monitors add logged values
            stage="features", run_dir=run_dir, manager=manager, train=train, config=config,
            parallel=parallel, training=training)],
    )
    fit_stage(stage.trainer, "features", manager, config, train.release_freed_buffers)
    trainer, training, network = stage.trainer, stage.training, stage.network
    summary = {
        "steps": trainer.step,
        "stop_reason": trainer.stop_reason or "finished",
        **training.summary(),
        **stage.fitted,
        "final": last_metrics(run_dir, "features"),
        "seconds_this_session": time.perf_counter() - started,
    }
    # The last checkpoint is written: gradients and optimizer state are not needed again.
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.optimizer.state.clear()
    if config.precision == "bf16-weights":  # exports, pictures and evaluation in fp32
        network.float()
    export_weights(network, run_dir)  # streamed from the shards (terabrain.train.export)
    weights = WholeWeights(network)
    picture = learner.picture(config, network, weights, shape)  # may gather: every rank
    if is_main_rank():
        save_filter_grid(run_dir / "filters.png", picture.filters, picture.shape)
        if picture.comparable and config.source_network is None:  # images, not a layer
            summary["filters"] = compare_with_random(
                picture.filters, picture.shape, data.holdout_x, config.seed
            )
    results.record("features", summary)
    return network


@torch.no_grad()
def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> dict:
    model.eval()
    output = full(model(x)).float()
    if task == "classification":
        return {"test_accuracy": float((output.argmax(dim=1) == y).float().mean())}
    return {"test_mse": float(torch.nn.functional.mse_loss(output, y.float().reshape(output.shape)))}


def _supervised_stage(
    config: ExperimentConfig, data: PreparedData, features: torch.nn.Module, run_dir: Path,
    device: torch.device, results: Results, parallel: Parallelism,
) -> None:
    settings = config.supervised
    torch.manual_seed(config.seed + 1)
    outputs = data.num_classes if settings.task == "classification" else (
        1 if data.train_y.dim() == 1 else data.train_y.shape[1]
    )
    hidden = learner_of(config).feature_width(config, features)
    model = SupervisedHead(features, hidden, outputs, settings.dropout, seed=config.seed + 1)
    model = parallel.parallelize(model.to(device), device)
    if not settings.fine_tune:
        for parameter in model.features.parameters():
            parameter.requires_grad_(False)
    train = settings.train
    manager = CheckpointManager(run_dir / "supervised" / "checkpoints", keep=train.keep_checkpoints)
    _check_divisible(train, len(data.train_x), parallel)
    trainer = build_trainer(
        model, build_supervised_objective(settings.task), optimizer=settings.optimizer,
        train=train, seed=config.seed, precision=config.precision, inputs=data.train_x,
        targets=data.train_y, parallel=parallel, device=device,
        callbacks=run_callbacks(stage="supervised", run_dir=run_dir, manager=manager,
                                train=train, config=config, parallel=parallel),
    )
    fit_stage(trainer, "supervised", manager, config, train.release_freed_buffers)
    export_weights(model, run_dir / "supervised")
    evaluation = _evaluate(
        model, parallel.inputs(data.holdout_x.to(device)), data.holdout_y.to(device), settings.task
    )
    results.record(
        "supervised",
        {"steps": trainer.step, "final": last_metrics(run_dir, "supervised"), **evaluation},
    )


def run_experiment(
    config: ExperimentConfig, run_dir: Path, mesh: DeviceMesh | None = None
) -> dict[str, Any]:
    """Train ``config`` in ``run_dir``; continues from its checkpoints if it has any.
    ``mesh``: the (data, model) mesh when launched on several ranks (see terabrain.parallel)."""
    parallel = Parallelism(mesh, config.parallel)
    device = resolve_device(config.device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    if is_main_rank():
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = to_yaml(config)
        path = run_dir / "config.yaml"
        if not path.exists() or path.read_text() != resolved:
            write_text_atomically(path, resolved)
    torch.manual_seed(config.seed)
    data = prepare_data(config.data, config.seed, parallel.data)
    if data.stream is not None and config.supervised is not None:
        raise ConfigError("supervised: the supervised stage needs labelled data in memory; "
                          "set data.stream false (npy) or drop supervised")
    if data.whitening is not None and is_main_rank():
        replace_atomically(run_dir / "whitening.safetensors", data.whitening.save)
    results = Results(run_dir / "results.json")
    source = None
    if config.source_network is not None:  # the examples become a layer's activations
        data, source = network_stage(config, data, run_dir, device, results)
    if not results.done("data"):  # what analysis needs to rebuild the model's input
        results.record("data", {"example_shape": list(data.example_shape)})
    try:
        monitors = [] if source is None else downstream_monitors(config, data, source, parallel)
        features = _feature_stage(config, data, run_dir, device, results, parallel, monitors)
    finally:
        if data.stream is not None:
            data.stream.close()  # stops background staging
    if config.supervised is not None:
        _supervised_stage(config, data, features, run_dir, device, results, parallel)
    if source is not None and is_main_rank() and not results.done("splice"):
        results.record("splice", splice_stage(config, data, source, run_dir))
    results.record("memory", peak_memory_by_rank(device))  # after the export, the last peak
    return results.data
