"""The streaming loader: this rank's share of every global batch, decoded by parallel
workers and prefetched while the trainer computes.

Position: the batch of step ``s`` is a pure function of (seed, epoch, s, rank) (see
``SampleOrder`` and ``Parallelism.rows``), so the trainer's step is the whole position; a
run restored at step ``s`` asks for batch ``s`` and the stream starts reading there — the
resumed epoch continues without repeating or skipping an example. What is not derivable
(the count of skipped examples) is checkpointed as a global total, equal on every rank,
which is what DCP needs for a value saved under the same key by every rank.

Workers: ``thread`` (a pool decodes the examples of a batch in parallel; Pillow releases
the GIL while decoding and resizing) or ``process`` (``torch.utils.data.DataLoader``
workers, each producing whole batches). Either way batches arrive in step order, at most
``prefetch`` ahead, in pinned memory when training on CUDA.

Bad examples: with ``on_error="skip"`` an unreadable example is counted, named in a warning,
and replaced by the next usable example of the same rank's order: the examples this rank
reads at the following steps of the same epoch (wrapping round to the epoch's first step),
taken in that order, passing over unreadable ones. Every step thus sees a full batch, and the
batch is still a pure function of (seed, epoch, step, rank) and of which files are damaged,
so a resumed run reads exactly what the uninterrupted one did. The replacement is read twice
in that epoch (here and at its own step); only the damaged slot is counted as skipped. With
``"fail"`` the run stops with a TrainingError naming the file. If no example of the rank's
whole epoch is readable the run stops either way (there is nothing to train on). No wait is
unbounded: if no batch arrives within ``timeout_s`` the run stops and says what it was waiting
for. The decode threads are daemon threads and the run does not wait for them once it has
given up: a read blocked in the kernel (a hung network file system) cannot be interrupted, but
it cannot keep the process alive past ``timeout_s`` either. (The catalogs never open a FIFO or
a device, so no ordinary read blocks; see terabrain.data.catalogs.)
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

import numpy as np
import torch

from terabrain.data.decode import BadSample
from terabrain.data.order import SampleOrder
from terabrain.errors import TrainingError

Reader = Callable[[int, int], np.ndarray]  # (example index, epoch) -> rows (k, D)
WARN_LIMIT = 20


class _Batch:
    __slots__ = ("step", "x", "bad", "error")

    def __init__(self, step, x=None, bad=(), error=None):
        self.step, self.x, self.bad, self.error = step, x, list(bad), error


class BatchStream:
    def __init__(
        self,
        read: Reader,
        order: SampleOrder,
        *,
        ids: Optional[np.ndarray] = None,
        share: Optional["ReplicaShare"] = None,
        reduce_sum: Optional[Callable[[torch.Tensor], None]] = None,
        transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        workers: int = 4,
        kind: str = "thread",
        prefetch: int = 4,
        timeout_s: float = 120.0,
        on_error: str = "skip",
        device: torch.device = torch.device("cpu"),
        per_sample: int = 1,
        unusable: int = 0,
    ):
        if kind not in ("thread", "process"):
            raise ValueError(f"workers kind {kind!r}; allowed: thread, process")
        self.read = read
        self.order = order
        self.ids = ids if ids is not None else np.arange(order.samples)
        self.share = share or ReplicaShare(0, 1)
        self.reduce_sum = reduce_sum
        self.transform = transform
        self.workers = workers
        self.kind = kind
        self.prefetch = max(1, prefetch)
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.device = device
        self.pin = device.type == "cuda"
        self.per_sample = per_sample
        self.unusable = unusable
        self.skipped = 0  # this rank, this session
        self.last_rows = 0  # examples in this rank's latest batch (the metrics report their sum)
        self.skipped_before = 0  # all ranks, earlier sessions (from the checkpoint)
        self._next: Optional[int] = None
        self._pipeline = None
        self._warned = 0
        self.staging = None  # a Stager whose progress joins the metrics, when staging

    # --- what the trainer sees -----------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Examples in a global batch (all replicas together)."""
        return self.order.batch * self.per_sample

    def local_ids(self, step: int) -> np.ndarray:
        """The examples (catalog indices) this rank reads for ``step``."""
        positions = self.share(self.order.global_batch(step))
        return self.ids[positions.numpy()]

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        if self._next != step:
            self._start(step)
        item = self._pipeline.get(step)
        self._next = step + 1
        if item.error is not None:
            self.close()
            raise item.error
        self._account(item.bad)
        self.last_rows = len(item.x)
        return item.x.to(self.device, non_blocking=self.pin), None

    def metrics(self) -> dict[str, float]:
        """Counters for the metrics line: a collective over replicas (every rank calls it)."""
        skipped, rows = self._global_counts()
        counters = {"data_skipped": float(skipped), "data_unusable": float(self.unusable),
                    "data_batch": float(rows)}
        if self.staging is not None:
            counters.update(self.staging.progress())
        return counters

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"skipped": torch.tensor(self._global_counts()[0], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.skipped_before = int(state["skipped"])
        self.skipped = 0

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()
            self._pipeline = None
        self._next = None

    # --- producing batches ----------------------------------------------------------------

    def _global_counts(self) -> tuple[int, int]:
        """(skipped examples, all sessions; examples in the latest global batch), all replicas."""
        count = torch.tensor([float(self.skipped), float(self.last_rows)], dtype=torch.float64)
        if self.reduce_sum is not None:
            self.reduce_sum(count)
        return self.skipped_before + int(count[0].item()), int(count[1].item())

    def _account(self, bad: list[tuple[str, str]]) -> None:
        self.skipped += len(bad)
        for name, reason in bad:
            if self._warned < WARN_LIMIT:
                self._warned += 1
                more = " (further skips are counted, not printed)" if self._warned == WARN_LIMIT else ""
                print(f"terabrain: skipped {name}: {reason}{more}", file=sys.stderr)

    def _start(self, step: int) -> None:
        self.close()
        pipeline = _ThreadPipeline if self.kind == "thread" else _ProcessPipeline
        self._pipeline = pipeline(self, step)

    def make(self, step: int, pool: Optional[DaemonPool] = None) -> _Batch:
        """Read, preprocess and assemble this rank's batch of ``step``."""
        epoch = self.order.epoch(step)

        def read(ids) -> list:
            if pool is None:
                return [_read_one(self.read, int(i), epoch) for i in ids]
            return list(pool.map(lambda i: _read_one(self.read, int(i), epoch), ids))

        results = read(self.local_ids(step))
        bad = [(r.name, r.reason) for r in results if isinstance(r, BadSample)]
        if bad and self.on_error == "fail":
            name, reason = bad[0]
            return _Batch(step, error=BadSample(name, f"{reason} (data.on_error is fail)"))
        holes = [slot for slot, r in enumerate(results) if isinstance(r, BadSample)]
        if holes:
            candidates = self._replacements(step)
            while holes:
                wanted = list(itertools.islice(candidates, len(holes)))
                if not wanted:
                    return _Batch(step, error=TrainingError(
                        f"no readable example in this rank's whole epoch at step {step}, e.g. "
                        f"{bad[0][0]} ({bad[0][1]}); check the collection with `terabrain data stats`"))
                for found in read(wanted):
                    if not isinstance(found, BadSample):
                        results[holes.pop(0)] = found
        x = np.concatenate(results).astype(np.float32, copy=False)
        if self.transform is not None:
            x = self.transform(x)
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return _Batch(step, tensor, bad)


    def _replacements(self, step: int):
        """The examples this rank reads at the steps after ``step`` in the same epoch,
        wrapping round to the epoch's first step: what replaces a damaged example."""
        per_epoch = self.order.per_epoch
        first = self.order.epoch(step) * per_epoch
        for later in range(1, per_epoch):
            yield from self.local_ids(first + (step - first + later) % per_epoch)


class DaemonPool:
    """A fixed set of daemon threads running ``map`` in order. Unlike ThreadPoolExecutor,
    whose threads the interpreter joins at exit, a thread stuck in a read never keeps the
    process from ending."""

    def __init__(self, workers: int, name: str):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            future, function, argument = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(argument))
            except BaseException as error:  # noqa: BLE001 (handed to map's caller)
                future.set_exception(error)

    def map(self, function: Callable[[Any], Any], items: Any,
            timeout: Optional[float] = None) -> list[Any]:
        """``[function(item) ...]`` in order; TimeoutError when the whole call takes longer
        than ``timeout`` seconds."""
        futures = []
        for item in items:
            future: Future = Future()
            self.tasks.put((future, function, item))
            futures.append(future)
        deadline = None if timeout is None else time.monotonic() + timeout
        return [future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                for future in futures]

    def shutdown(self, wait: bool = True) -> None:
        while True:  # queued work is cancelled, never started
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self.threads:
            self.tasks.put(None)
        if wait:
            for thread in self.threads:
                thread.join()


def _read_one(read: Reader, index: int, epoch: int):
    try:
        return read(index, epoch)
    except BadSample as bad:
        return bad


class _ThreadPipeline:
    """A producer thread fills a bounded queue in step order; a pool decodes in parallel."""

    def __init__(self, stream: BatchStream, start: int):
        self.stream = stream
        self.queue: queue.Queue = queue.Queue(maxsize=stream.prefetch)
        self.stopping = threading.Event()
        self.pool = DaemonPool(stream.workers, "terabrain-decode") if stream.workers > 0 else None
        self.thread = threading.Thread(target=self._run, args=(start,), name="terabrain-loader", daemon=True)
        self.thread.start()

    def _run(self, step: int) -> None:
        while not self.stopping.is_set():
            try:
                item = self.stream.make(step, self.pool)
                if item.x is not None and self.stream.pin:
                    item.x = item.x.pin_memory()
            except BaseException as error:  # handed to the trainer's thread, never lost
                item = _Batch(step, error=error if isinstance(error, TrainingError)
                              else TrainingError(f"data loader failed at step {step}: {error!r}"))
            while not self.stopping.is_set():
                try:
                    self.queue.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if item.error is not None:
                return
            step += 1

    def get(self, step: int) -> _Batch:
        deadline = time.monotonic() + self.stream.timeout_s
        while True:
            try:
                item = self.queue.get(timeout=min(1.0, self.stream.timeout_s))
            except queue.Empty:
                if not self.thread.is_alive():
                    raise TrainingError(f"data loader stopped before step {step}") from None
                if time.monotonic() > deadline:
                    self.stop(abandon=True)
                    raise TrainingError(
                        f"no batch for step {step} within data.read_timeout_s = "
                        f"{self.stream.timeout_s:g} s (is the file system hanging?)") from None
                continue
            assert item.step == step, (item.step, step)
            return item

    def stop(self, abandon: bool = False) -> None:
        """``abandon``: the reads are stuck; the run goes on (to its error) without them,
        and later calls (the stream's close) do not wait for them either."""
        self.abandoned = abandon = abandon or getattr(self, "abandoned", False)
        self.stopping.set()
        self.thread.join(timeout=1 if abandon else 30)
        if self.pool is not None:
            self.pool.shutdown(wait=not abandon and not self.thread.is_alive())


def _as_is(item):
    return item


class ReplicaShare:
    """This replica's contiguous share of a global batch's rows: the same rule as
    ``DataParallel.shard`` (which the in-memory path uses), as a picklable object so that
    worker processes can apply it."""

    def __init__(self, rank: int, replicas: int):
        self.rank, self.replicas = rank, replicas

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        share = len(rows) // self.replicas
        return rows[self.rank * share : (self.rank + 1) * share]


class _Steps:
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class _StepBatches(torch.utils.data.Dataset):
    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __getitem__(self, step: int) -> tuple:
        try:
            item = self.stream.make(step)
        except Exception as error:  # returned, so the message arrives unchanged
            item = _Batch(step, error=TrainingError(f"data worker failed at step {step}: {error!r}"))
        return (item.step, item.x, item.bad, item.error)


class _ProcessPipeline:
    """DataLoader worker processes, each making whole batches, delivered in step order."""

    def __init__(self, stream: BatchStream, start: int):
        from torch.utils.data import DataLoader

        self.stream = stream
        workers = max(1, stream.workers)
        loader = DataLoader(
            _StepBatches(_WorkerView(stream)), batch_size=None, sampler=_Steps(start),
            num_workers=workers, prefetch_factor=max(1, -(-stream.prefetch // workers)),
            pin_memory=stream.pin, timeout=stream.timeout_s, collate_fn=_as_is,
        )
        self.iterator = iter(loader)

    def get(self, step: int) -> _Batch:
        try:
            got, x, bad, error = next(self.iterator)
        except RuntimeError as error:
            self.stop()
            raise TrainingError(f"data workers failed before step {step}: {error}") from None
        assert got == step, (got, step)
        return _Batch(step, x, bad, error)

    def stop(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.iterator = None


class _WorkerView(BatchStream):
    """What a worker process needs of the stream: no collective, no pipeline."""

    def __init__(self, stream: BatchStream):
        self.__dict__.update({k: v for k, v in stream.__dict__.items() if k not in ("_pipeline", "reduce_sum")})
        self._pipeline = None
        self.reduce_sum = None
