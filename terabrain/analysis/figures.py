"""The report's pictures: learning curves, reconstructions beside inputs, and per-neuron rows
of top stimuli with the optimal stimulus. matplotlib Figures drawn without pyplot, so no
backend is chosen (nor a display needed) and nothing process-wide is set on import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

# Metrics lines hold these besides the losses; they are not curves of the objective.
_NOT_LOSSES = {"stage", "step", "examples_per_s", "step_time_s", "data_time_s",
               "compute_time_s", "lr", "wall_s"}


def as_picture(image: np.ndarray, symmetric: bool) -> np.ndarray:
    """An image (H, W) or (H, W, 3) as floats in [0, 1] to draw. ``symmetric``: whitened or
    signed data, drawn with zero mid-grey and the largest magnitude at black/white; otherwise
    the values are already intensities in [0, 1]."""
    image = np.asarray(image, np.float64)
    if symmetric:
        image = 0.5 + 0.5 * image / max(np.abs(image).max(), 1e-12)
    return np.clip(image, 0.0, 1.0)


def _show(axis, image: np.ndarray, symmetric: bool) -> None:
    picture = as_picture(image, symmetric)
    axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1,
                interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def learning_curves(metrics_path: Path, out: Path) -> Optional[list[str]]:
    """One panel per stage, every logged loss term against the step. Returns the stages
    drawn, or None when there is no metrics file."""
    if not metrics_path.exists():
        return None
    stages: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        curves = stages.setdefault(record.get("stage", "features"), {})
        for key, value in record.items():
            if key not in _NOT_LOSSES and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((record["step"], float(value)))
    if not stages:
        return None
    figure = Figure(figsize=(5 * len(stages), 3.4))
    axes = figure.subplots(1, len(stages), squeeze=False)
    for axis, (stage, curves) in zip(axes[0], stages.items()):
        for key, points in sorted(curves.items()):
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        positive = all(v > 0 for points in curves.values() for _, v in points)
        if positive:
            axis.set_yscale("log")
            plain = matplotlib.ticker.FormatStrFormatter("%.3g")  # 36, not 3.6 x 10^1
            axis.yaxis.set_major_formatter(plain)
            axis.yaxis.set_minor_formatter(plain)
        axis.set_title(f"stage: {stage}")
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    return list(stages)


def reconstructions(inputs: np.ndarray, outputs: np.ndarray, out: Path, symmetric: bool) -> None:
    """Inputs on top, their reconstructions below. Each pair shares the input's scale, so a
    weak reconstruction looks weak."""
    count = len(inputs)
    figure = Figure(figsize=(1.1 * count, 2.5))
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        scale = max(np.abs(inputs[column]).max(), 1e-12)
        for row, image in enumerate((inputs[column], outputs[column])):
            picture = 0.5 + 0.5 * image / scale if symmetric else image
            _show(axes[row, column], picture, False)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def neuron_rows(
    stimuli: Sequence[Sequence[np.ndarray]],
    optimal: Optional[Sequence[np.ndarray]],
    labels: Sequence[str],
    out: Path,
    symmetric_stimuli: bool,
    captions: Optional[Sequence[Sequence[str]]] = None,
) -> None:
    """One row per neuron: its top stimuli (best first), then its optimal stimulus (none
    when ``optimal`` is None)."""
    rows = len(stimuli)
    k = max(len(row) for row in stimuli)
    extra = 0 if optimal is None else 1
    figure = Figure(figsize=(1.25 * (k + extra) + 1.6, 1.3 * rows + 0.4))
    axes = figure.subplots(rows, k + extra, squeeze=False)
    for row in range(rows):
        for column in range(k):
            axis = axes[row, column]
            if column < len(stimuli[row]):
                _show(axis, stimuli[row][column], symmetric_stimuli)
                if captions is not None:
                    axis.set_xlabel(captions[row][column], fontsize=7)
            else:
                axis.axis("off")
        if optimal is not None:
            _show(axes[row, k], optimal[row], True)
        axes[row, 0].set_ylabel(labels[row], fontsize=8, rotation=0, ha="right", va="center")
    if optimal is not None:
        axes[0, k].set_title("optimal", fontsize=8)
    for column in range(k):
        axes[0, column].set_title(f"#{column + 1}", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def density_histogram(density: np.ndarray, out: Path) -> None:
    """How often each latent fires: a histogram of log10(fraction of examples), the latents
    that never fired counted at the left edge."""
    density = np.asarray(density, np.float64)
    alive = density[density > 0]
    floor = np.log10(alive.min()) - 0.5 if len(alive) else -4.0
    values = np.where(density > 0, np.log10(np.maximum(density, 1e-12)), floor)
    figure = Figure(figsize=(5.0, 2.8))
    axis = figure.subplots()
    axis.hist(values, bins=40, color="0.3")
    axis.set_xlabel("log10 fraction of examples a latent fires on (never: left edge)")
    axis.set_ylabel("latents")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
