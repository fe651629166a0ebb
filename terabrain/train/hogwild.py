"""Hogwild (Recht et al. 2011; Noel 2015's first approach): ``parallel.workers`` processes on
one machine update one copy of the parameters in shared memory, without locks.

The model's parameters and the training data are moved to shared memory
(``torch.multiprocessing``) and each worker (a ``forkserver`` process) takes every
``workers``-th batch of the run's batch order (worker w: steps w, w + workers, ...), computes
its gradient against whatever the parameters are at that moment and applies its own optimizer
step in place. Reads and writes race; that is the method. The main process does no training:
it receives each worker's loss, counts updates as steps and runs the usual callbacks
(metrics, TensorBoard, checkpoints, early stopping) on the shared model.

When it helps: Hogwild's convergence guarantee assumes sparse updates, where two workers
rarely write the same parameter. The dense layers trained here are not sparse: every update
writes every weight, so concurrent updates overwrite each other and the gain over one process
is bounded by the machine's memory bandwidth (Noel 2015: it "plateaus with core counts").
Each worker's optimizer state (momentum, Adam's moments) is its own and is not checkpointed:
a resumed Hogwild run restarts those from zero.
"""

from __future__ import annotations

import queue as queue_module
import time
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from terabrain.data.eight_bit import unit_float
from terabrain.errors import TrainingError
from terabrain.train.trainer import StepTimes, Trainer

# A worker that sends nothing for this long is taken as hung.
_SILENCE_S = 600.0


def _worker(
    worker: int, workers: int, model: torch.nn.Module, objective: Any,
    optimizer_class: type, optimizer_defaults: dict, inputs: torch.Tensor,
    targets: Optional[torch.Tensor], order: Any, first_step: int, steps: int,
    reports: Any, stop: Any, threads: int,
) -> None:
    try:
        torch.set_num_threads(threads)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_class(parameters, **optimizer_defaults)
        model.train()
        for step in range(first_step + worker, steps, workers):
            if stop.is_set():
                break
            rows = order.indices(step)
            x = unit_float(inputs if rows is None else inputs[rows])
            y = None if targets is None else (targets if rows is None else targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss, _ = objective(model, x, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                objective.after_step(model)
            reports.put((worker, step, loss.item()))
        reports.put((worker, None, None))
    except BaseException as error:  # reported to the main process, which stops the run
        reports.put((worker, "error", f"{type(error).__name__}: {error}"))


def fit_hogwild(trainer: Trainer, workers: int) -> None:
    """``trainer.fit()`` with ``workers`` lock-free worker processes. Continues from
    ``trainer.step`` (a restored checkpoint)."""
    if trainer.device.type != "cpu":
        raise TrainingError("parallel.mode hogwild runs on CPU (device: cpu): CUDA memory "
                            "cannot be shared lock-free between processes this way")
    if trainer.parallel.mesh is not None:
        raise TrainingError("parallel.mode hogwild runs in one launcher rank; it starts its "
                            "own worker processes (parallel.workers)")
    model = trainer.model.share_memory()
    inputs = trainer.inputs.share_memory_()
    targets = trainer.targets.share_memory_() if trainer.targets is not None else None
    # forkserver: workers are forked from a clean server process that imported terabrain
    # once (not from this one, whose OpenMP thread pool a fork would copy in a broken state),
    # so N workers cost one interpreter start, not N.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["terabrain.train.hogwild"])
    reports = context.Queue()
    stop = context.Event()
    threads = max(1, torch.get_num_threads() // workers)
    optimizer = trainer.optimizer
    processes = [
        context.Process(
            target=_worker, daemon=True,
            args=(w, workers, model, trainer.objective, type(optimizer), dict(optimizer.defaults),
                  inputs, targets, trainer.order, trainer.step, trainer.steps, reports, stop, threads),
        )
        for w in range(workers)
    ]
    for callback in trainer.callbacks:
        callback.on_train_start(trainer)
    for process in processes:
        process.start()
    try:
        _follow(trainer, reports, stop, workers)
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    for callback in trainer.callbacks:
        callback.on_train_end(trainer)


def _follow(trainer: Trainer, reports: Any, stop: Any, workers: int) -> None:
    finished = 0
    last = time.perf_counter()
    while finished < workers:
        try:
            worker, step, loss = reports.get(timeout=_SILENCE_S)
        except queue_module.Empty:
            raise TrainingError(f"hogwild: no worker reported for {_SILENCE_S:.0f} s") from None
        if step == "error":
            raise TrainingError(f"hogwild worker {worker} failed: {loss}")
        if step is None:
            finished += 1
            continue
        if trainer.stop_reason is not None:
            continue  # updates already in flight when a callback asked to stop
        trainer.step += 1
        now = time.perf_counter()
        trainer.times = StepTimes(0.0, now - last)
        last = now
        metrics = {"step": trainer.step, "loss": loss}
        for callback in trainer.callbacks:
            callback.on_step_end(trainer, trainer.step, metrics)
        if trainer.stop_reason is not None:
            stop.set()

