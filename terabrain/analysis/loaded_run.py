"""A finished run directory, loaded for analysis: its config, trained feature learner, the
preprocessing it was trained with, and a same-shaped network with random weights.

New images reach the model exactly as training data did (``to_model_input``): resized to the
run's example shape, made grey or colour, each example's mean removed and the run's own ZCA
(``whitening.safetensors``) applied, as terabrain.data.prepare does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from terabrain.config.loader import load_experiment
from terabrain.config.schema import ExperimentConfig
from terabrain.data.contrast import normalize_contrast
from terabrain.data.embedded import to_colour, to_grey
from terabrain.data.faces import resize
from terabrain.data.patches import remove_patch_mean
from terabrain.data.sources import source_of
from terabrain.data.whitening import ZCA
from terabrain.errors import ConfigError
from terabrain.learners.registry import learner_of
from terabrain.source_network import LayerTap, layer_activations, load_network, load_weights
from terabrain.train.export import exported, load_exported


def example_shape(config: ExperimentConfig) -> tuple[int, ...]:
    """One training example as an image: (H, W) or (H, W, C), from the data source table."""
    shape = source_of(config.data).example_shape(config.data)
    if len(shape) == 1:
        side = int(round(np.sqrt(shape[0])))
        if side * side != shape[0]:
            raise ConfigError(f"data.path: rows of {shape[0]} values are not square images; "
                              f"analysis needs (N, H, W[, C]) data")
        return (side, side)
    return tuple(shape)


@dataclass
class LoadedRun:
    run_dir: Path
    config: ExperimentConfig
    model: torch.nn.Module
    whitening: Optional[ZCA]
    shape: tuple[int, ...]
    network: LayerTap | None = None
    """A run on a network's layer (``source_network``): the trained network, tapped at that
    layer; the model's inputs are then the layer's activations of the data's examples."""
    image_shape: tuple[int, ...] | None = None
    """With ``network``: one of the data's examples (what the network takes)."""

    @property
    def inputs(self) -> int:
        return int(np.prod(self.shape))

    @property
    def colour(self) -> bool:
        return len(self.shape) == 3

    def random_model(self, seed: int) -> torch.nn.Module:
        """The same architecture with the initial random weights of ``seed`` (never trained)."""
        return _build(self.config, self.shape, seed).eval()

    def to_model_input(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W[, C]) images in [0, 1] -> (N, inputs) rows as the model saw in training."""
        shape = self.image_shape if self.network is not None else self.shape
        colour = len(shape) == 3
        images = np.asarray(images, np.float32)
        if images.ndim == 2:  # already rows
            images = images.reshape(len(images), *shape)
        images = to_colour(images, 3) if colour else to_grey(images, 3)
        if images.shape[1:3] != shape[:2]:
            if shape[0] != shape[1]:
                raise ConfigError(f"cannot resize images to the run's {shape} examples")
            images = resize(images, shape[0])
        rows = images.reshape(len(images), -1)
        if self.config.data.remove_mean:
            rows = remove_patch_mean(rows, 3 if colour else 1)
        lcn = self.config.data.lcn
        if lcn is not None:
            rows = normalize_contrast(rows, shape, lcn.kernel, lcn.sigma)
        if self.whitening is not None:
            rows = self.whitening.apply(rows)
        return self.from_prepared(torch.from_numpy(np.ascontiguousarray(rows, np.float32)))

    def from_prepared(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows preprocessed as terabrain.data.prepare does -> the model's inputs (the same
        rows, or their activations at the network's layer)."""
        if self.network is None:
            return rows
        section = self.config.source_network
        return layer_activations(self.network, rows, self.image_shape, section.input,
                                 section.batch_size)


def _build(config: ExperimentConfig, shape: tuple[int, ...], seed: int) -> torch.nn.Module:
    return learner_of(config).build(config, shape, seed)


def _recorded_example_shape(run_dir: Path) -> Optional[tuple[int, ...]]:
    """The example shape the run trained on, as results.json records it (runs since the
    streamed sources; older runs: None)."""
    path = run_dir / "results.json"
    if path.is_file():
        shape = json.loads(path.read_text()).get("data", {}).get("example_shape")
        if shape:
            return tuple(shape)
    return None


def load_run(run_dir: Path) -> LoadedRun:
    """Raises ConfigError naming the missing file when ``run_dir`` is not a finished run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a finished run directory (no config.yaml)")
    if not exported(run_dir):
        raise ConfigError(f"{run_dir} is not a finished run directory (no model.safetensors)")
    config = load_experiment(str(run_dir / "config.yaml"))
    recorded = _recorded_example_shape(run_dir)
    shape = recorded if recorded is not None else example_shape(config)
    model = _build(config, shape, config.seed)
    try:
        model.load_state_dict(load_exported(run_dir, error=ConfigError))
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"{run_dir}/model.safetensors does not fit config.yaml: "
                          f"{str(error).splitlines()[0]}") from None
    whitening = None
    if config.data.whitening == "zca":
        path = run_dir / "whitening.safetensors"
        if not path.is_file():
            raise ConfigError(f"{run_dir}: config.yaml says data.whitening zca but "
                              f"whitening.safetensors is missing")
        whitening = ZCA.load(path)
    network, image_shape = None, None
    if config.source_network is not None:
        network, image_shape = _source_network(run_dir, config)
    return LoadedRun(run_dir, config, model.eval(), whitening, shape, network, image_shape)


def _source_network(run_dir: Path, config: ExperimentConfig) -> tuple[LayerTap, tuple[int, ...]]:
    """The run's network as it was tapped: trained in the run (network/model.safetensors)
    or as the config names it."""
    section = config.source_network
    network = load_network(section.model, section.weights, config.seed)
    if section.training is not None:
        if not exported(run_dir / "network"):
            raise ConfigError(f"{run_dir} is not a finished run directory (no "
                              "network/model.safetensors)")
        load_weights(network, load_exported(run_dir / "network", error=ConfigError),
                     f"{run_dir}/network/model.safetensors")
    shape = tuple(source_of(config.data).example_shape(config.data))
    return LayerTap(network.eval(), section.layer), shape
