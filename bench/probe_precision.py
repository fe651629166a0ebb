"""One loss-and-gradient evaluation of `terabrain evaluate`'s probe (multinomial logistic
regression on standardised pooled features, 48,000 x 6,400 by default: the validation path's
rows at K = 1,600) with the features in float32 (before) and in bfloat16 (now, the default
`--precision bf16`), measured in the same run. Prints seconds per evaluation and the ratio.

    python bench/probe_precision.py [--rows 48000] [--features 6400] [--repeats 4]

The evaluation reads the whole feature matrix twice (logits, weight gradient) and is
memory-bound, so halving the bytes roughly halves the time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def evaluation_seconds(z: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    weight = torch.zeros(10, z.shape[1], requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)

    def evaluate():
        weight.grad = bias.grad = None
        logits = (z @ weight.T.to(z.dtype)).float() + bias
        (F.cross_entropy(logits, y) + 0.5e-4 * weight.pow(2).sum()).backward()

    evaluate()  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        evaluate()
    return (time.process_time() - cpu) / repeats, (time.perf_counter() - wall) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=48000)
    parser.add_argument("--features", type=int, default=6400)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(args.rows, args.features, generator=generator)
    y = torch.randint(0, 10, (args.rows,), generator=generator)
    before_cpu, before = evaluation_seconds(z, y, args.repeats)
    after_cpu, after = evaluation_seconds(z.bfloat16(), y, args.repeats)
    print(f"{args.rows} x {args.features}: float32 {before:.3f} s ({before_cpu:.3f} CPU s), "
          f"bfloat16 {after:.3f} s ({after_cpu:.3f} CPU s) per evaluation; "
          f"ratio {before / after:.1f}x wall, {before_cpu / after_cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
