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
        images = np.asarray(images, np.float32)
        if images.ndim == 2:  # already rows
            images = images.reshape(len(images), *self.shape)
        images = to_colour(images, 3) if self.colour else to_grey(images, 3)
        if images.shape[1:3] != self.shape[:2]:
            if self.shape[0] != self.shape[1]:
                raise ConfigError(f"cannot resize images to the run's {self.shape} examples")
            images = resize(images, self.shape[0])
        rows = images.reshape(len(images), -1)
        if self.config.data.remove_mean:
            rows = remove_patch_mean(rows, 3 if self.colour else 1)
        lcn = self.config.data.lcn
        if lcn is not None:
            rows = normalize_contrast(rows, self.shape, lcn.kernel, lcn.sigma)
        if self.whitening is not None:
            rows = self.whitening.apply(rows)
        return torch.from_numpy(np.ascontiguousarray(rows, np.float32))


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
    return LoadedRun(run_dir, config, model.eval(), whitening, shape)
