#!/usr/bin/env python
"""terabrain's training step against a hand-written PyTorch loop of the same model.

The model is the tied autoencoder ``h = sigmoid(x W^T + b1)``, ``x' = h W + b2`` with the
squared reconstruction error summed over input dimensions and averaged over the batch,
trained with SGD (lr 0.01, momentum 0.9). Both sides start from the same weights, see the
same batches of the same random data in the same order and do the same number of steps:

* terabrain: ``Autoencoder`` + ``ReconstructionObjective`` + ``build_optimizer`` and whole
  ``Trainer.fit()`` calls with the callbacks a real run uses that write no checkpoints
  (``MetricsLogger`` into a temporary directory, ``NaNGuard``, ``EarlyStopping(0, 0)``).
* plain: the same math written out with ``torch`` and ``torch.optim.SGD``, reading the loss
  on logged steps only, as a hand-written loop would.

It also times the bare matrix multiplies the step has to do (the GEMM ceiling). With the
inputs not requiring a gradient a tied step is 5 GEMMs of 2*batch*inputs*hidden FLOPs each:
forward ``x W^T`` and ``h W``; backward ``g W^T`` (gradient of h), ``h^T g`` (decoder's
share of dW) and ``g_z^T x`` (encoder's share of dW). The count is checked against
``torch.utils.flop_counter`` on one real step of each side.

Repetitions are interleaved (GEMMs, plain, terabrain, GEMMs, plain, ...) so CPU clock drift
hits both sides alike; the table shows the median of the repetitions and their range.

    python bench/step_overhead.py                      # defaults: 4096 x 4096, batch 256
    python bench/step_overhead.py --device cuda --steps 200 --repeats 5 --json
    python bench/step_overhead.py --profile            # also: op-level profile of one step
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.nn.autoencoder import Autoencoder
from terabrain.objectives import ReconstructionObjective
from terabrain.train.callbacks import EarlyStopping, MetricsLogger, NaNGuard
from terabrain.train.optim import build_optimizer
from terabrain.train.stage import build_trainer
from terabrain.train.trainer import BatchOrder, Trainer

LR, MOMENTUM, LOG_EVERY, TARGET = 0.01, 0.9, 10, 1.05
GEMMS_PER_STEP = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=0, help="data set rows (0: 16 batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each")
    args = parser.parse_args(argv)
    args.rows = args.rows or 16 * args.batch
    if args.rows < args.batch:
        parser.error("--rows must be at least --batch")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("step_overhead: --device cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the plain side ------------------------------------------------------------------------


class PlainLoop:
    """The tied autoencoder and its SGD loop, by hand. Batches: for epoch e, rows of
    ``randperm(rows)`` seeded with ``seed * 1_000_003 + e``, cut in consecutive batches
    (the same rule as terabrain's ``BatchOrder``; checked in ``main``)."""

    def __init__(self, weight, encoder_bias, decoder_bias, data, batch: int, seed: int):
        self.W = nn.Parameter(weight.detach().clone())
        self.b1 = nn.Parameter(encoder_bias.detach().clone())
        self.b2 = nn.Parameter(decoder_bias.detach().clone())
        self.optimizer = torch.optim.SGD([self.W, self.b1, self.b2], lr=LR, momentum=MOMENTUM)
        self.data = data
        self.batch = batch
        self.per_epoch = len(data) // batch
        self.seed = seed
        self.last_loss = float("nan")

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=generator)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        h = torch.sigmoid(x @ self.W.T + self.b1)
        reconstruction = h @ self.W + self.b2
        loss = (reconstruction - x).pow(2).sum(dim=1).mean()
        loss.backward()
        self.optimizer.step()
        return loss

    def fit(self, steps: int) -> None:
        cached, order = -1, None
        for step in range(steps):
            epoch, position = divmod(step, self.per_epoch)
            if self.batch == len(self.data):
                x = self.data
            else:
                if epoch != cached:
                    order, cached = self.permutation(epoch).to(self.data.device), epoch
                x = self.data[order[position * self.batch : (position + 1) * self.batch]]
            loss = self.step(x)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                self.last_loss = loss.item()


# --- the terabrain side --------------------------------------------------------------------


class TerabrainLoop:
    """A fresh ``Trainer`` per ``fit`` (it restarts at step 0, so every repetition sees the
    same batches as the plain loop); model and optimizer carry over, as on the plain side."""

    def __init__(self, model, data, batch: int, seed: int, device: torch.device, scratch: Path):
        self.model = model
        self.objective = ReconstructionObjective()
        self.optimizer = build_optimizer(
            OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM), model.parameters()
        )
        self.data, self.batch, self.seed, self.device = data, batch, seed, device
        self.scratch = scratch
        self.runs = 0
        self.last_loss = float("nan")

    def trainer(self, steps: int, callbacks=None) -> tuple[Trainer, Path]:
        self.runs += 1
        metrics = self.scratch / f"run{self.runs}" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True)
        if callbacks is None:
            callbacks = [MetricsLogger(metrics, "features"), NaNGuard(), EarlyStopping(0, 0.0)]
        trainer = build_trainer(
            self.model, self.objective, optimizer=self.optimizer,
            train=TrainConfig(steps=steps, batch_size=self.batch, log_every=LOG_EVERY),
            seed=self.seed, inputs=self.data, device=self.device, callbacks=callbacks,
        )
        return trainer, metrics

    def timed_fit(self, steps: int) -> float:
        trainer, metrics = self.trainer(steps)
        synchronize(self.device)
        begin = time.perf_counter()
        trainer.fit()
        synchronize(self.device)
        seconds = time.perf_counter() - begin
        if trainer.step != steps:
            raise RuntimeError(f"terabrain stopped at step {trainer.step}: {trainer.stop_reason}")
        self.last_loss = json.loads(metrics.read_text().splitlines()[-1])["loss"]
        return seconds


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - begin


# --- the GEMM ceiling ----------------------------------------------------------------------


class Gemms:
    """The step's matrix multiplies with the layouts autograd uses, on random operands."""

    def __init__(self, batch: int, inputs: int, hidden: int, device: torch.device):
        def rand(*shape):
            return torch.rand(*shape, device=device)

        self.x, self.h = rand(batch, inputs), rand(batch, hidden)
        self.g, self.gz = rand(batch, inputs), rand(batch, hidden)
        self.W = rand(hidden, inputs)
        self.device = device

    def once(self) -> None:
        torch.mm(self.x, self.W.T)  # forward: encoder pre-activation
        torch.mm(self.h, self.W)  # forward: reconstruction
        torch.mm(self.g, self.W.T)  # backward: gradient of h
        torch.mm(self.h.T, self.g)  # backward: decoder's share of dW
        torch.mm(self.gz.T, self.x)  # backward: encoder's share of dW

    def seconds(self, repeats: int = 3) -> float:
        return statistics.median(timed(self.once, self.device) for _ in range(repeats))


def count_gemm_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --- report --------------------------------------------------------------------------------


def profile_step(label: str, fn, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: one {label} step (fit of 1 step) ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    data = torch.rand(args.rows, args.inputs).to(device)  # pixel-like values in [0, 1)
    model = Autoencoder(args.inputs, args.hidden, tied=True, activation="sigmoid").to(device)
    plain = PlainLoop(
        model.encoder.weight, model.encoder.bias, model.decoder_bias, data, args.batch, args.seed
    )

    # Same batches: the plain rule against terabrain's BatchOrder, over three epochs.
    order = BatchOrder(args.rows, args.batch, args.seed)
    for step in range(3 * order.per_epoch):
        epoch, position = divmod(step, plain.per_epoch)
        expected = order.indices(step)
        if expected is not None:
            rows = plain.permutation(epoch)[position * args.batch : (position + 1) * args.batch]
            assert torch.equal(rows, expected), f"batch orders differ at step {step}"

    with tempfile.TemporaryDirectory(prefix="terabrain-bench-") as scratch:
        ours = TerabrainLoop(model, data, args.batch, args.seed, device, Path(scratch))

        # Same work: GEMM FLOPs of one step of each side, on throwaway copies.
        plain_copy = copy.deepcopy(plain)
        plain_flops = count_gemm_flops(lambda: plain_copy.fit(1))
        ours_copy = TerabrainLoop(
            copy.deepcopy(model), data, args.batch, args.seed, device, Path(scratch) / "count"
        )
        ours_flops = count_gemm_flops(lambda: ours_copy.trainer(1, callbacks=[])[0].fit())
        del plain_copy, ours_copy
        expected_flops = GEMMS_PER_STEP * 2 * args.batch * args.inputs * args.hidden
        if not plain_flops == ours_flops == expected_flops:
            print(
                f"warning: GEMM FLOPs per step: plain {plain_flops}, terabrain {ours_flops}, "
                f"expected {expected_flops}", file=sys.stderr,
            )
        gemms = Gemms(args.batch, args.inputs, args.hidden, device)

        # Warm-up (allocator, MKL/cuBLAS handles, momentum buffers), untimed.
        gemms.seconds(1)
        plain.fit(args.warmup)
        ours.timed_fit(args.warmup)

        times: dict[str, list[float]] = {"gemm": [], "plain": [], "terabrain": []}
        other = OtherLoad()
        for _ in range(args.repeats):
            times["gemm"].append(gemms.seconds())
            times["plain"].append(timed(lambda: plain.fit(args.steps), device) / args.steps)
            times["terabrain"].append(ours.timed_fit(args.steps) / args.steps)

        other_cores = other.cores()
        loss_gap = abs(ours.last_loss - plain.last_loss) / max(abs(plain.last_loss), 1e-30)

        if args.profile:
            profile_step("plain", lambda: plain.fit(1), device)
            trainer, _ = ours.trainer(1)
            profile_step("terabrain", trainer.fit, device)

    gflop = expected_flops / 1e9
    median = {side: statistics.median(values) for side, values in times.items()}
    ratio = median["terabrain"] / median["plain"]
    best_ratio = min(times["terabrain"]) / min(times["plain"])
    threads = torch.get_num_threads() if device.type == "cpu" else None
    where = (
        f"cpu, {threads} threads" if device.type == "cpu"
        else f"{torch.cuda.get_device_name(device)}, tf32 matmul "
        f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    )
    print(
        f"tied autoencoder {args.inputs} x {args.hidden}, batch {args.batch}, fp32, "
        f"SGD momentum {MOMENTUM}; {where}; torch {torch.__version__}"
    )
    print(
        f"{args.steps} steps x {args.repeats} interleaved repeats per side after {args.warmup} "
        f"warm-up steps; GEMM work {gflop:.1f} GFLOP/step ({GEMMS_PER_STEP} GEMMs)"
    )
    print()
    print(f"{'':<16}{'step ms':>9}{'range ms':>17}{'images/s':>10}{'GFLOP/s':>9}{'of ceiling':>12}")
    labels = {"gemm": "GEMM ceiling", "plain": "plain PyTorch", "terabrain": "terabrain"}
    def ms(seconds: float) -> str:  # 350.2, or 0.427 for tiny models
        return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.3f}"

    for side, label in labels.items():
        m = median[side]
        spread = f"{ms(min(times[side]))}-{ms(max(times[side]))}"
        print(
            f"{label:<16}{ms(m):>9}{spread:>17}{args.batch / m:>10.0f}"
            f"{gflop / m:>9.1f}{median['gemm'] / m:>11.1%}"
        )
    print()
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(
        f"terabrain / plain: {ratio:.3f} (target <= {TARGET:.2f}: {verdict}); "
        f"best repetition of each: {best_ratio:.3f}"
    )
    print(f"final loss: plain {plain.last_loss:.6g}, terabrain {ours.last_loss:.6g} "
          f"(relative gap {loss_gap:.1e})")

    if other_cores is not None:
        busy = other_cores > 0.05
        print(f"other processes used {other_cores:.2f} cores while measuring"
              + (" -- the machine was busy; these figures are not reliable" if busy else ""))

    if args.json:
        print(json.dumps({
            "device": device.type, "where": where, "torch": torch.__version__,
            "threads": threads, "inputs": args.inputs, "hidden": args.hidden,
            "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
            "gflop_per_step": gflop,
            **{f"{side}_step_s": median[side] for side in times},
            **{f"{side}_step_s_all": times[side] for side in times},
            "ratio": ratio, "best_ratio": best_ratio, "target": TARGET, "ok": ratio <= TARGET,
            "other_load_cores": other_cores,
            "plain_loss": plain.last_loss, "terabrain_loss": ours.last_loss,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
