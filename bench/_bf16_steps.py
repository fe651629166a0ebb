"""Part of bench/gpu_check.sh: N bf16 (autocast) steps of the largest lbann-ae whose planned
peak fits the device, through terabrain's Trainer; prints achieved TFLOP/s, MFU against
``--peak-tflops`` (H200 dense bf16: about 790) and the peak memory against the plan.

    python bench/_bf16_steps.py --device cuda            # the largest hidden that fits
    python bench/_bf16_steps.py --device cpu --tiny      # a dry run of the same path
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from terabrain.capacity import plan_experiment
from terabrain.config.loader import load_experiment
from terabrain.train.stage import feature_trainer


def config_for(hidden: int, tiny: bool, device: str):
    sets = [f"model.hidden={hidden}", "precision=bf16", f"device={device}",
            "optimizer.momentum=0.9", "train.progress=false"]
    if tiny:
        sets += ["data.patch_size=16", "data.num_patches=80", "data.holdout_patches=8"]
    else:
        sets += ["data.patch_size=256", "data.num_patches=80", "data.holdout_patches=8"]
    return load_experiment("lbann-ae-small", sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    memory = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
              else 4 * 2**30 if args.tiny else 16 * 2**30)
    hidden = 64 if args.tiny else 1000
    while not args.tiny:  # the largest multiple of 1,000 hidden units the plan fits
        plan = plan_experiment(config_for(hidden + 1000, False, args.device), 1, memory)
        if not plan.splits[0].fits:
            break
        hidden += 1000
    config = config_for(hidden, args.tiny, args.device)
    plan = plan_experiment(config, 1, memory)
    shape = (config.data.patch_size, config.data.patch_size, 3)
    torch.manual_seed(0)
    inputs = torch.rand(config.data.num_patches, shape[0] * shape[1] * shape[2])
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"steps": args.steps, "log_every": args.steps})})
    stage = feature_trainer(config, shape, inputs=inputs, device=device)
    network, trainer = stage.network, stage.trainer
    parameters = sum(p.numel() for p in network.parameters())
    trainer.train_step(*trainer.batch(0))  # warm-up, not timed
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    losses = []
    for step in range(args.steps):
        losses.append(float(trainer.train_step(*trainer.batch(step + 1))["loss"]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    flops = 6 * config.train.batch_size * parameters * args.steps  # forward 2, backward 4
    tflops = flops / seconds / 1e12
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"lbann-ae {shape[0] * shape[1] * 3:,} -> {hidden:,} tied, {parameters:,} parameters, "
          f"bf16 autocast, batch {config.train.batch_size}, {args.steps} steps on {device}")
    print(f"loss {losses[0]:.4g} -> {losses[-1]:.4g}; {seconds / args.steps * 1e3:.1f} ms/step")
    print(f"achieved {tflops:.3f} TFLOP/s; MFU {100 * tflops / args.peak_tflops:.2f}% of "
          f"{args.peak_tflops:g} TFLOP/s")
    print(f"peak memory {peak / 1e9:.2f} GB against the plan's {plan.splits[0].total / 1e9:.2f} GB "
          f"({'device allocator' if device.type == 'cuda' else 'process RSS'})")
    if not losses[-1] < losses[0]:
        sys.exit("loss did not fall")


if __name__ == "__main__":
    main()
