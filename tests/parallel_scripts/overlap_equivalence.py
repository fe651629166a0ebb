"""One rank of the test of ``parallel.overlap``, run under torchrun with 2 (or 4) ranks.

For each case it trains the same model twice on scikit-learn's digits with data parallelism,
once with the flat all-reduce after the backward pass (``parallel.overlap=false``) and once
with gradients reduced during it, in blocks of about 1 KiB (so the 64 x 32 weight goes in 8
blocks), and compares every logged loss and every final parameter: equal bit for bit on 2
ranks, to rounding on more. It also checks which path each weight took: a weight with one
gradient contribution (tied autoencoder, RICA) in blocks, one with weight decay through
autograd (two contributions) whole, after its second. Case ``change``: a graph that gains a
contribution after the first step must stop with GradientOrderError instead of averaging a
buffer autograd is still adding into. Prints ``rank R: all cases ok``.
"""

import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

from terabrain.config.schema import OptimizerConfig, ParallelConfig, TrainConfig
from terabrain.nn import gradient_blocks, gradient_buffers
from terabrain.nn.autoencoder import RICA, Autoencoder
from terabrain.objectives import ReconstructionObjective, RICAObjective
from terabrain.parallel import build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed
from terabrain.parallel.overlap import GradientOrderError
from terabrain.parallel.parallelism import Parallelism
from terabrain.train.stage import build_trainer

HIDDEN, BATCH, STEPS = 32, 64, 12
BLOCK_MB = 1024 / 2**20  # 1 KiB: 8 rows of 32 floats


def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


CASES = {
    # name: (model factory, objective, optimizer, blocks expected for the weight)
    "tied": (lambda: Autoencoder(64, HIDDEN, tied=True, activation="sigmoid", seed=3),
             ReconstructionObjective(), OptimizerConfig(name="sgd", lr=0.05, momentum=0.9), True),
    "rica": (lambda: RICA(64, HIDDEN, seed=3), RICAObjective(0.1, 0.01),
             OptimizerConfig(name="adam", lr=0.01), True),
    "rica-lbfgs": (lambda: RICA(64, HIDDEN, seed=3), RICAObjective(0.1, 0.01),
                   OptimizerConfig(name="lbfgs", lr=1.0, max_iter=4), True),
    "tied-decay": (lambda: Autoencoder(64, HIDDEN, tied=True, activation="sigmoid", seed=3),
                   ReconstructionObjective(weight_decay=1e-3),
                   OptimizerConfig(name="sgd", lr=0.05, momentum=0.9), False),
    "untied": (lambda: Autoencoder(64, HIDDEN, tied=False, activation="sigmoid", seed=3),
               ReconstructionObjective(weight_decay=1e-3), OptimizerConfig(name="adam", lr=0.01),
               False),
}


def train(case: str, overlap: bool, mesh, x):
    factory, objective, optimizer, _ = CASES[case]
    model = factory()
    parallel = Parallelism(mesh, ParallelConfig(overlap=overlap, overlap_block_mb=BLOCK_MB))
    losses = []

    class Record:
        def on_train_start(self, trainer): pass
        def on_step_end(self, trainer, step, metrics): losses.append(metrics["loss"])
        def on_train_end(self, trainer): pass

    trainer = build_trainer(model, objective, optimizer=optimizer,
                            train=TrainConfig(steps=STEPS, batch_size=BATCH, progress=False),
                            seed=0, inputs=x, parallel=parallel, callbacks=[Record()])
    trainer.fit()
    return model, losses, parallel


def check_case(case: str, mesh, x, exact: bool) -> None:
    flat_model, flat_losses, _ = train(case, False, mesh, x)
    model, losses, parallel = train(case, True, mesh, x)
    weight = next(p for p in model.parameters() if p.dim() == 2)
    blocks = gradient_blocks.listener_for(weight) is not None
    assert blocks == CASES[case][3], f"{case}: blocks {blocks}"
    if blocks:  # the exchange lets go of each step's gradient: the next one reuses its memory
        reused = gradient_buffers.buffer_for(weight).reused
        assert reused >= STEPS - 1, f"{case}: the gradient's memory reused {reused} times"
    if exact:
        assert losses == flat_losses, f"{case}: {losses} != {flat_losses}"
    else:
        assert torch.allclose(torch.tensor(losses), torch.tensor(flat_losses), rtol=1e-5), case
    for (name, a), b in zip(model.named_parameters(), flat_model.parameters()):
        # More ranks: the ring sums in another order; L-BFGS carries the rounding along.
        same = torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        assert same, f"{case}: {name} differs by {(a - b).abs().max().item()}"
    # Every replica holds the same weights.
    gathered = [torch.empty_like(weight) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weight.detach().contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{case}: replicas differ"
    # Bytes counted: the same as the flat exchange's (the gradients plus the logged values).
    sent, fp32 = parallel.exchange.take_bytes()
    assert sent > 0 and abs(sent - fp32) <= 8 * len(list(model.parameters())), (case, sent, fp32)


def check_changing_graph(mesh, x) -> None:
    """Weight decay switched on after the first step: a second contribution to W arrives."""
    objective = ReconstructionObjective(weight_decay=0.0)
    model = Autoencoder(64, HIDDEN, tied=True, activation="sigmoid", seed=3)
    parallel = Parallelism(mesh, ParallelConfig(overlap=True, overlap_block_mb=BLOCK_MB))
    trainer = build_trainer(model, objective, optimizer=OptimizerConfig(name="sgd", lr=0.05),
                            train=TrainConfig(steps=2, batch_size=BATCH, progress=False),
                            seed=0, inputs=x, parallel=parallel)
    trainer.fit()
    objective.weight_decay = 1e-3
    trainer.steps += 1
    try:
        trainer.fit()
    except GradientOrderError as error:
        assert "parallel.overlap=false" in str(error) and "encoder.weight" in str(error), error
    else:
        raise AssertionError("a contribution after the blocks started went unnoticed")


def main() -> int:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, backend="gloo")
        mesh = build_mesh(env.world_size, 1, env)
        x = digits()
        exact = env.world_size == 2
        for case in CASES:
            check_case(case, mesh, x, exact)
        check_changing_graph(mesh, x)
        print(f"rank {env.rank}: all cases ok", flush=True)
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
