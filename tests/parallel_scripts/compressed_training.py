"""One rank of a multi-process test of gradient compression, run under torchrun.

``train SCHEME... [localsgd]``: for each scheme, trains a small tied autoencoder on scikit-learn's digits
with data-parallel SGD (momentum) and that compression, checks after every step that all
replicas hold bit-identical weights and that the bytes counted equal the payload formula
(fixed-size schemes), and prints ``RESULT {json}`` on rank 0: the final loss on all digits and
the mean bytes per step. ``localsgd``: the same model with local SGD, whose replicas must
be equal exactly after each averaging step and differ in between.

``ledger`` (after the schemes, or after ``resume``): drives the exchange directly with random
gradients of awkward shapes (odd-sized vectors, a 3-D weight, more ranks than columns) and
checks at every step that the running sum of the averaged gradients it applied equals the
running sum of the true mean gradients minus the update its residuals still owe, i.e. error
feedback loses nothing, for the matrices' schemes and the bf16 vectors alike.

``save DIR`` / ``resume DIR``: checkpoint/resume of the error-feedback residuals. ``save``
trains 2K steps straight (the reference) and K steps with a checkpoint, restores that
checkpoint into a fresh trainer and continues to 2K: the weights must equal the reference
bit for bit; with the residuals zeroed after the restore they must not. It also records the
update still owed to the model (mean of the residuals over ranks). ``resume`` (another
number of ranks) restores that checkpoint and checks the owed update is unchanged.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

from terabrain.config.schema import OptimizerConfig, ParallelConfig, TrainConfig
from terabrain.nn.autoencoder import Autoencoder
from terabrain.objectives import ReconstructionObjective
from terabrain.parallel import build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed
from terabrain.parallel.communication_log import CommunicationLog
from terabrain.parallel.compressors import PackedBfloat16, build_compressor, threshold_for
from terabrain.parallel.exchange import (
    GradientExchange, all_reduce_bytes, column_ranges, exchange_columns,
)
from terabrain.parallel.localsgd import LocalSGD
from terabrain.parallel.parallelism import Parallelism
from terabrain.train.checkpoint import CheckpointManager, restore
from terabrain.train.stage import build_trainer

MOMENTUM_SGD = OptimizerConfig(name="sgd", lr=0.02, momentum=0.9)

HIDDEN, BATCH, STEPS, K = 32, 64, 200, 6


def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def make_trainer(x, settings, mesh, steps, callbacks=True):
    model = Autoencoder(x.shape[1], HIDDEN, tied=True, activation="sigmoid", seed=3)
    parallel = Parallelism(mesh, settings)
    return build_trainer(model, ReconstructionObjective(), optimizer=MOMENTUM_SGD,
                         train=TrainConfig(steps=steps, batch_size=BATCH), seed=0, inputs=x,
                         parallel=parallel,
                         callbacks=[CommunicationLog(parallel.exchange)] if callbacks else [])


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def expected_bytes(exchange, shapes, values: int) -> int:
    """Bytes one rank sends per step for gradients of ``shapes``, from the payload formulas,
    independently of the exchange's own counting."""
    n, me = exchange.size, exchange.rank
    if exchange.compressor.collective == "all_reduce":
        elements = sum(math.prod(shape) for shape in shapes)
        if exchange.compressor.name == "none":  # one fp32 buffer: gradients and values
            return all_reduce_bytes(elements + values, 4, n)
        return all_reduce_bytes(elements, 2, n) + all_reduce_bytes(values, 4, n)
    words = 0
    for shape in shapes:
        if len(shape) < 2:  # vectors: entries split over the ranks, bf16 two per word
            columns, length, scheme = math.prod(shape), 1, PackedBfloat16()
        else:  # matrices: columns of the (shape[0], rest) matrix
            columns, length, scheme = math.prod(shape[1:]), shape[0], exchange.compressor
        ranges = column_ranges(columns, n)
        size = lambda r: scheme.payload_words(r[1] - r[0], length)
        words += sum(size(r) for j, r in enumerate(ranges) if j != me)  # phase 1
        words += (n - 1) * size(ranges[me])                             # phase 2
    return 4 * words + all_reduce_bytes(values, 4, n)


def train(schemes, mesh, rank):
    x = digits()
    tau = None
    for scheme in schemes:
        if scheme == "threshold" and tau is None:
            probe = make_trainer(x, ParallelConfig(), mesh, 1, callbacks=False)
            loss, _ = probe.objective(probe.model, *probe.batch(0))
            loss.backward()
            tau = torch.tensor(threshold_for([p.grad for p in probe.model.parameters()], 1 / 32))
            dist.all_reduce(tau)  # every rank must use the same tau
            tau = float(tau) / dist.get_world_size()
        tuning = {"threshold": {"threshold_tau": tau}, "adaptive": {"adaptive_proportion": 1 / 16}}
        settings = ParallelConfig(compression=scheme, **tuning.get(scheme, {}))
        trainer = make_trainer(x, settings, mesh, STEPS, callbacks=False)
        exchange = trainer.parallel.exchange
        with torch.no_grad():
            initial, _ = trainer.objective(trainer.model, x)
        sent = 0
        for step in range(STEPS):
            parts = trainer.train_step(*trainer.batch(step))
            step_bytes, _ = exchange.take_bytes()
            sent += step_bytes
            if exchange.compressor.payload_words(1, 1) is not None:
                shapes = [p.shape for p in trainer.model.parameters()]
                assert step_bytes == expected_bytes(exchange, shapes, len(parts)), (scheme, step_bytes)
            weights = flat_weights(trainer.model)
            everyone = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, weights)
            assert all(torch.equal(weights, other) for other in everyone), f"{scheme}: replicas differ at step {step}"
        with torch.no_grad():
            final, _ = trainer.objective(trainer.model, x)
        if rank == 0:
            print("RESULT " + json.dumps({"scheme": scheme, "initial": float(initial), "loss": float(final),
                                          "bytes_per_step": sent / STEPS, "tau": tau}), flush=True)


def local_sgd(mesh, rank, every=5, steps=STEPS):
    """Replicas drift apart between averages and are equal right after each; the loss falls."""
    x = digits()
    settings = ParallelConfig(mode="localsgd", average_every=every)
    parallel = Parallelism(mesh, settings)
    model = Autoencoder(x.shape[1], HIDDEN, tied=True, activation="sigmoid", seed=3)
    averaging = LocalSGD(parallel, every)
    trainer = build_trainer(model, ReconstructionObjective(), optimizer=MOMENTUM_SGD,
                            train=TrainConfig(steps=steps, batch_size=BATCH), seed=0, inputs=x,
                            parallel=parallel, callbacks=[averaging])
    with torch.no_grad():
        initial, _ = trainer.objective(model, x)
    for step in range(1, steps + 1):
        trainer.train_step(*trainer.batch(step - 1))
        trainer.step = step
        averaging.on_step_end(trainer, step, {})
        weights = flat_weights(model)
        everyone = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, weights)
        same = all(torch.equal(weights, other) for other in everyone)
        assert same == (step % every == 0), f"local SGD: replicas equal={same} after step {step}"
    with torch.no_grad():
        final, _ = trainer.objective(model, x)
    assert averaging.averages == steps // every
    if rank == 0:
        print("RESULT " + json.dumps({"scheme": "localsgd", "initial": float(initial),
                                      "loss": float(final)}), flush=True)


LEDGER_SHAPES = [(6, 10), (7,), (3, 4, 5), (1,), (2, 3)]  # (2, 3): 3 columns, fewer than 4 ranks


def ledger(mesh, rank, steps=40):
    """Running sum applied = running sum of the true means - what the residuals still owe
    (checked every 8 steps)."""
    n = dist.get_world_size()
    for scheme in ("onebit", "adaptive", "threshold"):
        compressor = build_compressor(scheme, tau=0.3, proportion=1 / 4)
        exchange = GradientExchange(compressor, None, rank, n, mesh["data"])
        generator = torch.Generator().manual_seed(100 + rank)
        applied = [torch.zeros(shape, dtype=torch.float64) for shape in LEDGER_SHAPES]
        true = [torch.zeros(shape, dtype=torch.float64) for shape in LEDGER_SHAPES]
        for step in range(steps):
            gradients = [torch.randn(shape, generator=generator) * 0.2 + 0.05 for shape in LEDGER_SHAPES]
            for total, gradient in zip(true, gradients):
                mean = gradient.double()
                dist.all_reduce(mean)
                total += mean / n
            exchange.average_(gradients, [torch.tensor(1.0)])
            step_bytes, _ = exchange.take_bytes()
            if scheme != "threshold":
                assert step_bytes == expected_bytes(exchange, LEDGER_SHAPES, 1), (scheme, step, step_bytes)
            for total, gradient in zip(applied, gradients):
                total += gradient.double()
            # Every vector and matrix keeps both residuals.
            assert set(exchange.first) == set(exchange.second) == set(range(len(LEDGER_SHAPES)))
            if step % 8 != 7:
                continue  # the invariant holds at every step; checking it costs collectives
            owed = owed_update(exchange)
            for t in range(len(LEDGER_SHAPES)):
                debt = (owed[f"first.{t}"] + owed[f"second.{t}"]).double()  # (columns, length)
                gap = exchange_columns(applied[t]) - (exchange_columns(true[t]) - debt)
                assert gap.abs().max() < 1e-4, (scheme, step, t, gap.abs().max())
        if rank == 0:
            print(f"LEDGER {scheme} ok on {n} ranks", flush=True)


def owed_update(exchange) -> dict:
    """The update the residuals still owe the model, averaged over ranks: mean of the first
    residuals, and the whole second residual / ranks (gathered)."""
    owed = {}
    for t, residual in exchange.first.items():
        total = residual.clone()
        dist.all_reduce(total)
        owed[f"first.{t}"] = total / exchange.size
    for t, residual in exchange.second.items():
        pieces = [None] * exchange.size
        dist.all_gather_object(pieces, residual)
        owed[f"second.{t}"] = torch.cat(pieces) / exchange.size
    return owed


def save(directory: Path, mesh, rank):
    x = digits()
    settings = ParallelConfig(compression="onebit")
    reference = make_trainer(x, settings, mesh, 2 * K)
    reference.fit()
    first = make_trainer(x, settings, mesh, K)
    first.fit()
    manager = CheckpointManager(directory / "checkpoints")
    checkpoint = manager.save(K, first.state_dict())
    resumed = make_trainer(x, settings, mesh, 2 * K)
    restore(checkpoint, resumed)
    assert resumed.step == K
    resumed.fit()
    assert torch.equal(flat_weights(resumed.model), flat_weights(reference.model)), "resume is not exact"
    # Every gradient, the biases included, has its residuals in the checkpoint.
    parameters = len(list(first.model.parameters()))
    assert set(first.parallel.exchange.first) == set(range(parameters)), first.parallel.exchange.first.keys()
    zeroed = make_trainer(x, settings, mesh, 2 * K)
    restore(checkpoint, zeroed)
    for residuals in (zeroed.parallel.exchange.first, zeroed.parallel.exchange.second):
        for residual in residuals.values():
            residual.zero_()
    zeroed.fit()
    assert not torch.equal(flat_weights(zeroed.model), flat_weights(reference.model)), \
        "the residuals made no difference: the test would not see them missing"
    owed = owed_update(first.parallel.exchange)
    if rank == 0:
        torch.save(owed, directory / "owed.pt")
        print("SAVED exact resume ok", flush=True)


def resume(directory: Path, mesh, rank):
    x = digits()
    trainer = make_trainer(x, ParallelConfig(compression="onebit"), mesh, 2 * K)
    restore(CheckpointManager(directory / "checkpoints").latest(), trainer)
    owed = owed_update(trainer.parallel.exchange)
    expected = torch.load(directory / "owed.pt")
    assert owed.keys() == expected.keys(), (owed.keys(), expected.keys())
    for key, value in expected.items():
        assert torch.allclose(owed[key], value, atol=1e-6), key
    trainer.fit()  # and it trains on
    if rank == 0:
        print(f"RESUMED on {dist.get_world_size()} ranks: owed update preserved", flush=True)


def main(mode, args):
    torch.set_num_threads(1)
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=120)
        mesh = build_mesh(-1, 1, env)
        if mode == "train":
            train([a for a in args if a not in ("localsgd", "ledger")], mesh, env.rank)
            if "localsgd" in args:
                local_sgd(mesh, env.rank)
        elif mode == "save":
            save(Path(args[0]), mesh, env.rank)
        else:
            resume(Path(args[0]), mesh, env.rank)
        if "ledger" in args:
            ledger(mesh, env.rank)
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
