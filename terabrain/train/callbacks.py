"""Callbacks: what happens around the loop (logging, progress, checkpoints, stopping rules).

Order matters and is the order of the list: loggers first (so a NaN step is recorded),
then the NaN guard, then early stopping, then checkpointing (which must never save a step
the guard rejected).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from terabrain.errors import TrainingError
from terabrain.files import write_text_atomically
from terabrain.hooks import Callback, Plateau
from terabrain.parallel.parallelism import local
from terabrain.train.checkpoint import CheckpointManager
from terabrain.train.trainer import Trainer


class MetricsLogger(Callback):
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    On resume, lines of this stage beyond the restored step (written before the kill, and
    about to be written again) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, stage: str):
        self.path = Path(path)
        self.stage = stage
        self._start = 0.0
        self._last_time = 0.0
        self._last_step = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("stage") == self.stage and record.get("step", 0) > trainer.step:
                    continue
                kept.append(line)
            write_text_atomically(self.path, "".join(f"{line}\n" for line in kept))
        self._start = self._last_time = time.perf_counter()
        self._last_step = trainer.step

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not trainer.is_log_step(step):
            return
        now = time.perf_counter()
        steps = step - self._last_step
        elapsed = now - self._last_time
        record = {"stage": self.stage, **metrics}
        record["examples_per_s"] = steps * trainer.batch_size / elapsed if elapsed > 0 else 0.0
        record["step_time_s"] = elapsed / max(steps, 1)
        record["data_time_s"] = trainer.times.data_s
        record["compute_time_s"] = trainer.times.compute_s
        record["lr"] = trainer.optimizer.param_groups[0]["lr"]
        record["wall_s"] = now - self._start
        metrics.update({k: record[k] for k in ("examples_per_s", "step_time_s")})
        with open(self.path, "a") as stream:
            stream.write(json.dumps(record) + "\n")
        self._last_time, self._last_step = now, step


HISTOGRAM_VALUES = 2**20


class TensorBoardLogger(Callback):
    """Scalars every logged step, weight histograms, and the filter picture at the end."""

    def __init__(
        self,
        directory: Path,
        stage: str,
        histogram_every: int = 0,
        filter_image: Optional[Callable[[], "torch.Tensor"]] = None,
    ):
        self.directory = Path(directory)
        self.stage = stage
        self.histogram_every = histogram_every
        self.filter_image = filter_image
        self.writer = None
        self._histogram_step = -1

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(self.directory), purge_step=trainer.step or None)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.is_log_step(step):
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(f"{self.stage}/{name}", value, step)
        if self.histogram_every and step % self.histogram_every == 0:
            self._histograms(trainer, step)

    def _histograms(self, trainer: Trainer, step: int) -> None:
        if step == self._histogram_step:
            return
        self._histogram_step = step
        for name, parameter in trainer.model.named_parameters():
            if parameter.numel() > 1:
                values = local(parameter).detach().reshape(-1)
                # TensorBoard converts to float64 (twice the size): a strided sample of at
                # most HISTOGRAM_VALUES keeps that small for a billion-parameter weight.
                stride = max(1, values.numel() // HISTOGRAM_VALUES)
                self.writer.add_histogram(f"{self.stage}/{name}", values[::stride].cpu(), step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.histogram_every:
            self._histograms(trainer, trainer.step)
        if self.filter_image is not None:
            self.writer.add_image(
                f"{self.stage}/filters", self.filter_image(), trainer.step, dataformats="HWC"
            )
        self.writer.close()


class ProgressBar(Callback):
    """A tqdm bar with step, loss, examples/s and ETA; silent when not on a terminal."""

    def __init__(self, stage: str, enabled: bool = True):
        self.stage = stage
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=trainer.steps, initial=trainer.step, desc=self.stage, unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if "examples_per_s" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", ex_s=f"{metrics['examples_per_s']:.0f}")

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class NaNGuard(Callback):
    """Stops the run with a clear message when the loss stops being finite. Runs before
    checkpointing, so the last good checkpoint is never replaced by a diverged one."""

    def __init__(self, checkpoints: Optional[CheckpointManager] = None):
        self.checkpoints = checkpoints

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if math.isfinite(metrics["loss"]):
            return
        latest = self.checkpoints.latest() if self.checkpoints else None
        where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written"
        raise TrainingError(
            f"loss became {metrics['loss']} at step {step}; stopping. {where}. "
            "Lower optimizer.lr or check the data for NaN/Inf values."
        )


class EarlyStopping(Callback):
    """Stops when the loss has not improved by ``min_delta`` (relative) for ``patience``
    logged steps. Its counters are checkpointed so a resumed run stops at the same step."""

    def __init__(self, patience: int, min_delta: float):
        self.plateau = Plateau(patience, min_delta)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not self.plateau.patience or not trainer.is_log_step(step):
            return
        if self.plateau.update(metrics["loss"]):
            trainer.request_stop(
                f"early stopping: no improvement of the loss for {self.plateau.waited} logged steps"
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        best, waited = self.plateau.state()
        return {"best": best, "waited": waited}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.plateau.load(state["best"], state["waited"])


def _all_finite(tensor: torch.Tensor, piece: int = 2**22) -> bool:
    """``torch.isfinite(tensor).all()`` in pieces: isfinite makes a float copy (abs) and two
    boolean tensors, more than the weight itself for a large one."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(piece))


class Checkpointing(Callback):
    """A checkpoint every ``every`` steps (0: none on the way) and always a final one."""

    def __init__(self, manager: CheckpointManager, every: int):
        self.manager = manager
        self.every = every

    def _save(self, trainer: Trainer) -> None:
        for name, parameter in trainer.model.named_parameters():
            if not _all_finite(local(parameter).detach()):
                raise TrainingError(
                    f"parameter {name} is not finite at step {trainer.step}; not saving it. "
                    f"The last good checkpoint is {self.manager.latest()}."
                )
        self.manager.save(trainer.step, trainer.state_dict())

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.every and step % self.every == 0 and step != trainer.steps:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self.ensure_saved(trainer)

    def ensure_saved(self, trainer: Trainer) -> None:
        """A checkpoint of the current step, unless the newest one is of this step already."""
        latest = self.manager.latest()
        if latest is None or latest.name != f"step_{trainer.step}":
            self._save(trainer)
