"""The source network's stage (the ``source_network`` section): the network is loaded
(terabrain.source_network), trained on the data's labels when ``training`` says so (a stage
of its own, with checkpoints and an export in ``network/`` of the run directory), and then
the data's examples pass through it: the layer's activations become the examples the
feature learner trains on. They stay in memory (``cache`` also writes them as .npy shards
that ``data.source: activations`` reads).

Everything is a function of (config, seed), like the data: a resumed run loads the exported
network and takes the same activations again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from terabrain.config.schema import ExperimentConfig
from terabrain.data.prepare import PreparedData
from terabrain.errors import ConfigError, TrainingError
from terabrain.files import replace_atomically
from terabrain.hooks import Callback
from terabrain.objectives import ClassificationObjective
from terabrain.parallel.launch import is_main_rank
from terabrain.parallel.parallelism import full
from terabrain.source_network import (
    LayerTap,
    layer_activations,
    load_network,
    load_weights,
    network_input,
    network_outputs,
)
from terabrain.train.checkpoint import CheckpointManager
from terabrain.train.export import export_weights, load_exported
from terabrain.train.stage import build_trainer, fit_stage, last_metrics, run_callbacks

STAGE = "network"
SHARD_ROWS = 65536  # rows per cached .npy shard


class NetworkOnRows(nn.Module):
    """The network fed with example rows, as the trainer's batches come."""

    def __init__(self, network: nn.Module, example_shape: tuple[int, ...], layout: str):
        super().__init__()
        self.network, self.example_shape, self.layout = network, example_shape, layout

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.network(network_input(rows, self.example_shape, self.layout))


@dataclass
class SourceNetwork:
    """The trained source network and the data before its layer: what the report needs to
    splice reconstructions back in (terabrain.analysis.splice)."""

    tap: LayerTap
    inputs: PreparedData
    """The data's own examples (images) and labels."""
    layout: str
    batch_size: int

    def outputs(self, rows: torch.Tensor, replace_layer=None) -> torch.Tensor:
        return network_outputs(self.tap, rows, self.inputs.example_shape, self.layout,
                               self.batch_size, replace_layer)


def _train_network(config: ExperimentConfig, network: nn.Module, data: PreparedData,
                   run_dir: Path, device: torch.device, results: Any) -> None:
    settings, section = config.source_network.training, config.source_network
    directory = run_dir / STAGE
    if results.done(STAGE):
        load_weights(network, load_exported(directory, error=TrainingError),
                     f"{directory}/model.safetensors")
        return
    started = time.perf_counter()
    model = NetworkOnRows(network, data.example_shape, section.input).to(device)
    manager = CheckpointManager(directory / "checkpoints", keep=settings.train.keep_checkpoints)
    # One process's view on every rank: the source network is small next to the feature
    # learner, and the same seed and batches give every rank the same network.
    trainer = build_trainer(
        model, ClassificationObjective(), optimizer=settings.optimizer, train=settings.train,
        seed=config.seed, precision=config.precision, inputs=data.train_x,
        targets=data.train_y, device=device,
        callbacks=run_callbacks(stage=STAGE, run_dir=run_dir, manager=manager,
                                train=settings.train, config=config, parallel=_alone()),
    )
    fit_stage(trainer, STAGE, manager, config, settings.train.release_freed_buffers)
    network.to("cpu").eval()
    export_weights(network, directory)
    logits = network_outputs(LayerTap(network, section.layer), data.holdout_x,
                             data.example_shape, section.input, section.batch_size)
    accuracy = float((logits.argmax(dim=1) == data.holdout_y).float().mean())
    results.record(STAGE, {
        "steps": trainer.step, "stop_reason": trainer.stop_reason or "finished",
        "final": last_metrics(run_dir, STAGE), "test_accuracy": accuracy,
        "seconds_this_session": time.perf_counter() - started,
    })


class TappedBatches:
    """A streamed collection's batches (a BatchSource) taken through the network's layer as
    they arrive: the trainer sees activations, and no activation is ever stored."""

    def __init__(self, inner, tap: LayerTap, example_shape: tuple[int, ...], layout: str):
        self.inner, self.tap, self.example_shape, self.layout = inner, tap, example_shape, layout
        self.batch_size = inner.batch_size

    @torch.no_grad()
    def batch(self, step: int):
        x, y = self.inner.batch(step)
        taken = self.tap.activations(network_input(x.to("cpu"), self.example_shape, self.layout))
        return taken.float().to(x.device), y

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def close(self) -> None:
        self.inner.close()


class TappedStream:
    """A prepared streamed collection (terabrain.data.streamed_source.StreamSource) whose
    examples are the layer's activations: what run.py asks of ``PreparedData.stream``."""

    def __init__(self, stream, tap: LayerTap, example_shape: tuple[int, ...], layout: str):
        self.stream, self.tap, self.example_shape, self.layout = stream, tap, example_shape, layout

    def open(self, batch_size, parallel, device) -> TappedBatches:
        return TappedBatches(self.stream.open(batch_size, parallel, device), self.tap,
                             self.example_shape, self.layout)

    def close(self) -> None:
        self.stream.close()


def _alone():
    from terabrain.parallel.parallelism import Parallelism

    return Parallelism(None)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as stream:  # np.save would add .npy to the temporary's name
        np.save(stream, array)


def _write_shards(directory: Path, rows: torch.Tensor) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, len(rows), SHARD_ROWS)):
        piece = rows[start : start + SHARD_ROWS].numpy()
        replace_atomically(directory / f"{number:05d}.npy",
                           lambda path, piece=piece: _save_npy(path, piece))


def network_stage(config: ExperimentConfig, data: PreparedData, run_dir: Path,
                  device: torch.device, results: Any) -> tuple[PreparedData, SourceNetwork]:
    """The source network (trained when asked) and the data as its layer's activations:
    (examples of the feature learner, the network for the report)."""
    section = config.source_network
    if data.stream is not None and section.cache is not None:
        raise ConfigError("source_network.cache: a streamed collection's activations are "
                          "taken batch by batch and never held whole; set it null, or "
                          "data.stream false")
    network = load_network(section.model, section.weights, config.seed)
    tap = LayerTap(network, section.layer)  # a wrong layer name fails before any training
    if section.training is not None:
        _train_network(config, network, data, run_dir, device, results)
    network.to("cpu").eval()
    holdout = layer_activations(tap, data.holdout_x, data.example_shape, section.input,
                                section.batch_size)
    if data.stream is not None:  # each batch through the hook as the trainer asks for it
        train = None
        stream = TappedStream(data.stream, tap, data.example_shape, section.input)
    else:
        train = layer_activations(tap, data.train_x, data.example_shape, section.input,
                                  section.batch_size)
        stream = None
    if section.cache is not None and is_main_rank():
        _write_shards(Path(section.cache) / "train", train)
        _write_shards(Path(section.cache) / "holdout", holdout)
    if not results.done("activations"):
        results.record("activations", {
            "layer": section.layer, "width": holdout.shape[1],
            "train_rows": None if train is None else len(train), "holdout_rows": len(holdout),
            "streamed": stream is not None})
    taken = replace(data, train_x=train, holdout_x=holdout, example_shape=(holdout.shape[1],),
                    whitening=None, stream=stream)
    return taken, SourceNetwork(tap, data, section.input, section.batch_size)


def splice_stage(config: ExperimentConfig, data: PreparedData, source: SourceNetwork,
                 run_dir: Path) -> dict:
    """The report of a dictionary learnt on the network's layer (terabrain.analysis.splice),
    on the held-out examples, with the feature learner rebuilt on one process from its
    export (the same whatever mesh trained it)."""
    from terabrain.analysis.splice import splice_report
    from terabrain.data.sources import source_of
    from terabrain.learners.registry import learner_of

    learner = learner_of(config)
    network = learner.restore(config, data.example_shape, _alone(), torch.device("cpu"),
                              load_exported(run_dir, error=TrainingError)).eval()
    reconstruct = getattr(network, "reconstruct", None)
    if reconstruct is None or data.holdout_y is None:
        return {"skipped": f"model.kind {config.model.kind} gives no reconstruction"
                if reconstruct is None else "the held-out examples have no labels"}
    started = time.perf_counter()
    report = splice_report(
        lambda replace_layer: source.outputs(source.inputs.holdout_x, replace_layer),
        data.holdout_y, data.train_x, data.holdout_x, network.encode, reconstruct,
        source_of(config.data).class_names(config.data), config.seed,
    )
    return {**report, "seconds": time.perf_counter() - started}


class DownstreamCost(Callback):
    """On the feature learner's logged steps: the network's accuracy and cross-entropy on
    the first ``monitor_examples`` held-out examples with the layer's output replaced by
    the learner's reconstruction (``downstream_accuracy``, ``downstream_loss``), its loss
    increase and the fraction of the zero-ablation loss it recovers, beside the network as
    it is and with the layer zeroed or mean-ablated (constant, computed once). Every rank
    calls it (a placed learner's forward pass may be a collective); the main rank's loggers,
    which come after it, write what it adds."""

    def __init__(self, source: SourceNetwork, rows: torch.Tensor, labels: torch.Tensor,
                 layer_mean: torch.Tensor, parallel):
        self.source, self.rows, self.labels = source, rows, labels
        self.layer_mean, self.parallel = layer_mean, parallel
        self.reference: dict[str, float] | None = None

    def _scores(self, replace_layer) -> tuple[float, float]:
        logits = self.source.outputs(self.rows, replace_layer)
        return (float((logits.argmax(dim=1) == self.labels).float().mean()),
                float(torch.nn.functional.cross_entropy(logits, self.labels)))

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        model = trainer.model
        if not trainer.is_log_step(step) or not hasattr(model, "reconstruct"):
            return
        if self.reference is None:
            original = self._scores(None)
            zero = self._scores(torch.zeros_like)
            mean = self._scores(lambda layer: self.layer_mean.expand_as(layer))
            self.reference = {
                "downstream_accuracy_original": original[0], "downstream_loss_original": original[1],
                "downstream_accuracy_zero": zero[0], "downstream_accuracy_mean": mean[0],
                "downstream_loss_zero": zero[1]}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # BatchTopK's inference rule; nothing a training step keeps is touched

        def reconstruction(layer: torch.Tensor) -> torch.Tensor:
            rebuilt = model.reconstruct(self.parallel.inputs(layer.to(device)))
            return full(rebuilt).detach().float().cpu()

        try:
            accuracy, loss = self._scores(reconstruction)
        finally:
            model.train(was_training)
        reference = self.reference
        gap = reference["downstream_loss_zero"] - reference["downstream_loss_original"]
        metrics.update({
            **reference, "downstream_accuracy": accuracy, "downstream_loss": loss,
            "downstream_loss_increase": loss - reference["downstream_loss_original"],
            "downstream_loss_recovered": (reference["downstream_loss_zero"] - loss) / gap
            if gap else float("nan")})


def downstream_monitors(config: ExperimentConfig, data: PreparedData, source: SourceNetwork,
                        parallel) -> list[Callback]:
    """The feature stage's DownstreamCost, when the held-out examples have labels and
    ``source_network.monitor_examples`` is not 0."""
    count = config.source_network.monitor_examples
    inputs = source.inputs
    if not count or inputs.holdout_y is None:
        return []
    # The mean ablation's mean: the training activations, or the held-out ones when streamed.
    layer_mean = (data.train_x if data.train_x is not None else data.holdout_x).mean(dim=0)
    return [DownstreamCost(source, inputs.holdout_x[:count], inputs.holdout_y[:count],
                           layer_mean, parallel)]
