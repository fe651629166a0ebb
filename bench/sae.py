#!/usr/bin/env python
"""TopK sparse autoencoders (model.kind topk_sae): speed against a plain PyTorch loop, memory
per latent, latent sharding on 2 and 4 gloo ranks against one process, and the plan of a
16M-latent autoencoder on a 4,096-wide stream over 8-64 GPUs.

1. rows/s: terabrain's step (TopKSAE + TopKSAEObjective through train/stage.build_trainer's
   Trainer, Adam) against a hand-written TopK autoencoder loop (same math: pre-bias, top-k,
   ReLU, unit-norm decoder with the gradient's parallel part removed, Adam), same data,
   same steps, repetitions interleaved; the ratio is plain rows/s over terabrain rows/s.
2. bytes per latent: weights, gradients and Adam state per latent on one rank (the planner's
   figures, terabrain.learners.topk_sae).
3. sharding: bench/_sae_rank.py under torchrun on 2 and 4 ranks (all on the model axis):
   loss curves against one process, and the bytes each rank put into collectives, against
   the analytical minimum (every rank must receive the other ranks' top-k candidates, and a
   ring all-reduce of the rows x inputs reconstruction is bandwidth-optimal).
4. plan: `terabrain plan` of a 16,777,216-latent autoencoder (k = 32) on 4,096-wide
   activations for 8, 16, 32 and 64 GPUs of 80 GB.

    python bench/sae.py            # about 3 minutes on 2 shared CPU cores
    python bench/sae.py --json
    python bench/sae.py --steps 20 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import OtherLoad  # noqa: E402
from terabrain.config.schema import ExperimentConfig, OptimizerConfig, TrainConfig  # noqa: E402
from terabrain.learners.registry import LEARNERS  # noqa: E402
from terabrain.learners.topk_sae import TopKSAEObjective  # noqa: E402
from terabrain.nn.topk_sae import TopKSAE  # noqa: E402
from terabrain.train.stage import build_trainer  # noqa: E402


def plain_loop(x, inputs, latents, k, batch, steps, seed):
    """A TopK autoencoder written out in PyTorch: the baseline."""
    torch.manual_seed(0)
    reference = TopKSAE(inputs, latents, k, seed=seed)  # the same start as terabrain's
    w_enc = reference.encoder.detach().clone().requires_grad_()
    b_enc = torch.zeros(latents, requires_grad=True)
    w_dec = reference.decoder.detach().clone().requires_grad_()
    b_dec = torch.zeros(inputs, requires_grad=True)
    optimizer = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-3)
    w_dec.register_hook(lambda g: g - (g * w_dec).sum(1, keepdim=True) * w_dec)
    for step in range(steps):
        rows = x[step * batch:(step + 1) * batch]
        pre = (rows - b_dec) @ w_enc.t() + b_enc
        top = torch.topk(pre, k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        loss = (codes @ w_dec + b_dec - rows).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True)
    return loss.item()


def terabrain_loop(x, inputs, latents, k, batch, steps, seed):
    torch.manual_seed(0)
    model = TopKSAE(inputs, latents, k, seed=seed)
    trained = [model.encoder, model.encoder_bias, model.decoder, model.pre_bias]
    trainer = build_trainer(model, TopKSAEObjective(10**9, 0.0, 0.0),
                            optimizer=OptimizerConfig(name="adam", lr=1e-3), parameters=trained,
                            train=TrainConfig(steps=steps, batch_size=batch), seed=0, inputs=x)
    for step in range(steps):
        parts = trainer.train_step(x[step * batch:(step + 1) * batch], None)
    return parts["loss"].item()


def speed(inputs, latents, k, batch, steps, repeats):
    x = torch.randn(batch * steps, inputs, generator=torch.Generator().manual_seed(0))
    times = {"plain": [], "terabrain": []}
    losses = {}
    for _ in range(repeats):
        for name, loop in (("plain", plain_loop), ("terabrain", terabrain_loop)):
            begin = time.perf_counter()
            losses[name] = loop(x, inputs, latents, k, batch, steps, 1)
            times[name].append(time.perf_counter() - begin)
    rows = {name: batch * steps / statistics.median(t) for name, t in times.items()}
    return {"shape": f"{inputs} inputs, {latents} latents, k {k}, batch {batch}",
            "rows_per_s": rows, "ratio_plain_over_terabrain": rows["plain"] / rows["terabrain"],
            "final_loss": losses}


def sae_config(inputs_file, latents, k, batch):
    return ExperimentConfig.model_validate({
        "name": "sae", "data": {"source": "activations", "path": str(inputs_file),
                                "remove_mean": False, "whitening": "none", "stream": True},
        "model": {"kind": "topk_sae", "hidden": latents, "k": k, "k_aux": 512},
        "objective": {"kind": "reconstruction"}, "optimizer": {"name": "adam", "lr": 1e-4},
        "train": {"batch_size": batch}})


def bytes_per_latent(width_file):
    config = sae_config(width_file, 16_777_216, 32, 1024)
    capacity = LEARNERS["topk_sae"].capacity(config, (4096,))
    figures = capacity.per_rank(1, 1, 1024)
    state = figures.weights + figures.gradients + figures.optimizer
    return {"inputs": 4096, "weights+grads+adam bytes per latent": state / config.model.hidden}


def sharding(inputs, latents, k, batch, steps):
    results = []
    for ranks in (2, 4):
        command = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(ranks), str(REPO / "bench" / "_sae_rank.py"),
                   *(str(v) for v in (inputs, latents, k, batch, steps))]
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=900)
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith('{"ranks"'))
        row = json.loads(line)
        block = latents // ranks
        # This rank's contributions, sent the way a ring does: an all-gather forwards its
        # block to the (m-1) others, an all-reduce sends 2(m-1)/m of the payload.
        sent = ((ranks - 1) * row["payload_bytes"]["all_gather"]
                + 2 * (ranks - 1) / ranks * row["payload_bytes"]["all_reduce"])
        # Minimum per step: the other ranks' candidates reach this one (top-k and AuxK's
        # top-k_aux over this rank's block), and the (rows x inputs) reconstruction and AuxK
        # reconstruction are summed over ranks by a bandwidth-optimal all-reduce.
        k_aux = min(inputs // 2, latents)
        minimum = steps * ((ranks - 1) * 4 * batch * (min(k, block) + min(k_aux, block))
                           + 2 * 2 * (ranks - 1) / ranks * 4 * batch * inputs)
        difference = max(abs(a - b) / abs(a) for a, b in zip(row["single"], row["sharded"]))
        results.append({"ranks": ranks, "max_relative_loss_difference": difference,
                        "forward_bytes_sent_per_step": sent / steps,
                        "analytical_minimum_per_step": minimum / steps,
                        "collective_calls": row["calls"]})
    return results


def plans(width_file):
    from terabrain.capacity.planner import plan_experiment

    rows = []
    config = sae_config(width_file, 16_777_216, 32, 1024)
    for gpus in (8, 16, 32, 64):
        plan = plan_experiment(config, gpus, 80 * 10**9)
        best = next((s for s in plan.splits if s.recommended), None)
        smallest = min((s for s in plan.splits if s.valid), key=lambda s: s.total)
        chosen = best or smallest
        rows.append({"gpus": gpus, "fits": best is not None, "data": chosen.data,
                     "model": chosen.model, "GB_per_rank": chosen.total / 1e9,
                     "MB_sent_per_rank_per_step": chosen.sent / 1e6})
    return {"parameters": plan.parameters, "batch": 1024, "splits": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads for the speed comparison (1 avoids OpenMP "
                        "threads waiting for their share of a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = OtherLoad()
    with tempfile.TemporaryDirectory() as scratch:
        width_file = Path(scratch) / "w4096.npy"
        np.save(width_file, np.zeros((4, 4096), np.float32))  # the planner reads its header only
        report = {
            "speed": speed(256, 4096, 32, 256, args.steps, args.repeats),
            "memory": bytes_per_latent(width_file),
            "sharding": sharding(64, 1024, 8, 128, 3),
            "plan_16m": plans(width_file),
            "other_load_cores": load.cores(),
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    s = report["speed"]
    print(f"speed ({s['shape']}): plain {s['rows_per_s']['plain']:,.0f} rows/s, terabrain "
          f"{s['rows_per_s']['terabrain']:,.0f} rows/s, ratio {s['ratio_plain_over_terabrain']:.3f}")
    m = report["memory"]
    print(f"memory: {m['weights+grads+adam bytes per latent']:,.0f} B per latent at 4,096 inputs "
          "(weights, gradients, Adam)")
    for row in report["sharding"]:
        print(f"{row['ranks']} ranks: loss vs one process max rel diff "
              f"{row['max_relative_loss_difference']:.1e}; forward bytes sent per rank per step "
              f"{row['forward_bytes_sent_per_step']:,.0f} vs minimum "
              f"{row['analytical_minimum_per_step']:,.0f}; calls {row['collective_calls']}")
    p = report["plan_16m"]
    print(f"plan: {p['parameters']:,} parameters, batch {p['batch']}")
    for row in p["splits"]:
        print(f"  {row['gpus']} GPUs: {'fits' if row['fits'] else 'does not fit'} "
              f"data {row['data']} x model {row['model']}, {row['GB_per_rank']:.1f} GB/rank, "
              f"{row['MB_sent_per_rank_per_step']:,.1f} MB sent/rank/step")
    print(f"other load on the machine: {report['other_load_cores']:.1f} cores (shared CPU: noisy)")


if __name__ == "__main__":
    main()
