"""One rank of the TopK sparse autoencoder's multi-process tests, under torchrun.

``topk``: the exact sharded top-k (terabrain.parallel.latent_topk) on a model axis of all
ranks equals one process's ``ordered_topk`` bit for bit, on values full of ties (small
integers, -inf for masked latents), per example and over the whole batch (BatchTopK), for
several k including k larger than a rank's block. Prints ``rank R: topk ok (N cases)``.

``train DxM``: a TopKSAE trained by the Trainer on a DxM mesh (latents across the model
axis, rows across the data axis) against a single-process reference on the global batch,
for topk, batchtopk and relu; compares losses, gradients and weights after each step and
the dead-latent counters at the end. Prints ``rank R: CASE ok (...)`` and ``rank R: train ok``.
"""

import sys

import torch
import torch.distributed as dist

from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.learners.topk_sae import TopKSAEObjective
from terabrain.nn.topk_sae import TopKSAE, ordered_topk, selection_mask, selection_rows
from terabrain.parallel import (
    build_mesh,
    detect_launch_env,
    fail_fast,
    init_distributed,
    shutdown_distributed,
)
from terabrain.parallel.latent_topk import ShardedTopK, sharded_topk_counts
from terabrain.parallel.parallelism import Parallelism, full
from terabrain.train.stage import build_trainer

INPUTS, LATENTS, ROWS, BATCH, STEPS = 12, 16, 96, 32, 4


def check_topk(rank: int, ranks: int) -> None:
    group = dist.group.WORLD
    cases = 0
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        # Values from {0, 1, 2, 3}: most of the k-th values are tied across ranks.
        scores = torch.randint(0, 4, (7, 8 * ranks), generator=generator).float()
        scores[torch.rand(scores.shape, generator=generator) < 0.2] = -torch.inf
        block = scores.shape[1] // ranks
        mine = scores[:, rank * block:(rank + 1) * block]
        for k in (1, 3, block, block + 2, 2 * block + 1):
            for per_example in (True, False):
                kk = k if per_example else k * scores.shape[0]
                rows = selection_rows(scores, per_example)
                expected_values, _, expected = ordered_topk(rows, min(kk, rows.shape[1]))
                expected = selection_mask(expected, scores, per_example)
                local_rows = selection_rows(mine, per_example).contiguous()
                chosen, kth = sharded_topk_counts(local_rows, kk, group, rank, ranks)
                got = selection_mask(chosen, mine, per_example)
                want = expected[:, rank * block:(rank + 1) * block]
                assert torch.equal(got, want), (seed, k, per_example, got, want)
                assert torch.equal(kth, expected_values[:, -1:]), (seed, k, per_example)
                counts = torch.tensor([int(got.sum())])
                dist.all_reduce(counts, group=group)
                assert int(counts) == int(expected.sum()), (seed, k, per_example)
                cases += 1
    print(f"rank {rank}: topk ok ({cases} cases)", flush=True)


CASES = {
    # name: (activation, k, aux coefficient, l1 coefficient, dead steps)
    "topk": ("topk", 3, 1.0 / 32, 0.0, 2),
    "topk-all-dead": ("topk", 3, 0.5, 0.0, 0),  # every latent in AuxK from the first step
    "batchtopk": ("batchtopk", 3, 1.0 / 32, 0.0, 2),
    "relu-l1": ("relu", 3, 0.0, 1e-2, 2),
}


def _difference(reference, sharded, attribute):
    worst = 0.0
    for (name, a), b in zip(reference.named_parameters(), sharded.parameters()):
        if name == "fired" and attribute == "grad":
            continue  # firing counts, averaged over replicas: compared through the counters
        a, b = getattr(a, attribute), getattr(b, attribute)
        if a is None or b is None:
            assert a is None and b is None, f"{name}: gradient on one side only"
            continue
        scale = max(a.abs().max().item(), 1e-6)
        worst = max(worst, (a.float() - full(b).float()).abs().max().item() / scale)
    return worst


def _trainer(model, objective, x, parallel=None):
    trained = [model.encoder, model.encoder_bias, model.decoder, model.pre_bias]
    return build_trainer(model, objective, optimizer=OptimizerConfig(name="adam", lr=0.01),
                         parameters=trained, train=TrainConfig(steps=STEPS, batch_size=BATCH),
                         seed=0, inputs=x, parallel=parallel)


def run_case(name, parallel, rank):
    activation, k, aux, l1, dead_steps = CASES[name]
    if activation == "batchtopk" and parallel.data_ranks > 1:
        # BatchTopK ranks each replica's own batch (terabrain.nn.topk_sae): not the global
        # batch's selection, by design.
        print(f"rank {rank}: {name} skipped on a data axis", flush=True)
        return
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, INPUTS, generator=generator)
    objective = TopKSAEObjective(dead_steps, aux, l1)

    def factory():
        return TopKSAE(INPUTS, LATENTS, k, activation, k_aux=4, seed=5)

    torch.manual_seed(0)
    reference = _trainer(factory(), objective, x)
    with torch.device("meta"):
        unplaced = factory()
    model = parallel.parallelize(unplaced)
    if parallel.model_mesh is not None:
        model.selection = ShardedTopK(parallel.model_mesh)
    sharded = _trainer(model, objective, x, parallel)
    losses, grads, weights = [], [], []
    for step in range(STEPS):
        a = reference.train_step(*reference.batch(step))
        b = sharded.train_step(*sharded.batch(step))
        for part in a:
            assert abs(a[part].item() - full(b[part]).item()) <= 1e-4 * max(abs(a[part].item()), 1), (
                name, step, part, a[part].item(), full(b[part]).item())
        losses.append(abs(a["loss"].item() - full(b["loss"]).item()) / max(abs(a["loss"].item()), 1e-6))
        grads.append(_difference(reference.model, sharded.model, "grad"))
        weights.append(_difference(reference.model, sharded.model, "data"))
    assert max(losses) < 1e-5, f"{name}: losses differ by {losses}"
    assert max(grads) < 1e-4, f"{name}: gradients differ by {grads}"
    assert max(weights) < 1e-4, f"{name}: weights differ by {weights}"
    counters = full(sharded.model.steps_since_fired)
    assert torch.equal(counters, reference.model.steps_since_fired), (
        f"{name}: dead counters differ {counters} {reference.model.steps_since_fired}")
    threshold = full(sharded.model.threshold)
    assert abs(threshold.item() - reference.model.threshold.item()) < 1e-5, name
    print(f"rank {rank}: {name} ok (loss {max(losses):.1e}, grad {max(grads):.1e}, "
          f"weight {max(weights):.1e})", flush=True)


def main(mode: str, shape: str = "") -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=120)
        if mode == "topk":
            check_topk(env.rank, env.world_size)
        else:
            data, model = (int(size) for size in shape.split("x"))
            parallel = Parallelism(build_mesh(data, model, env))
            for name in CASES:
                run_case(name, parallel, env.rank)
            print(f"rank {env.rank}: train ok", flush=True)
        shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
