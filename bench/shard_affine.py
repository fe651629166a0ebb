#!/usr/bin/env python
"""What ``data.order: shard_affine`` costs and saves, on a modelled pack (no files written).

The pack: IMAGES JPEGs with log-normal sizes (median 100 kB, as photographs vary) written in
order into shards of --shard-size bytes, as ``terabrain data pack`` fills them. For each
(shard size, replicas) it prints what the assignment gives: the largest and smallest share,
the fraction of images that wait out an epoch (the price of equal steps per replica), the
epochs within which every image is read at least once, and the bytes one node stages
(RANKS_PER_NODE replicas per node) against the global order, which stages the whole pack.

Then it times the order itself (building the assignment and an epoch's batches) beside the
global ``SampleOrder`` on the same collection, in the same run, and states the ratio.

    python bench/shard_affine.py                  # 10M images, 64 and 256 replicas
    python bench/shard_affine.py --images 1000000 --json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from _common import OtherLoad  # bench/ is on sys.path: scripts run as bench/NAME.py

from terabrain.data.affine import ShardAffineOrder
from terabrain.data.order import SampleOrder

RANKS_PER_NODE = 8
LOCAL_BATCH = 192 // 8  # Ni et al. 2015's 192-image batches, split over a node's 8 ranks


def modelled_pack(images: int, shard_bytes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard of each image, bytes of each shard) for log-normal image sizes."""
    sizes = np.random.default_rng(seed).lognormal(np.log(100e3), 0.5, images) + 1024  # + tar header
    ends = np.cumsum(sizes)
    shard_of = (ends // shard_bytes).astype(np.int64)
    shard_of = np.unique(shard_of, return_inverse=True)[1]  # no empty shard numbers
    return shard_of, np.bincount(shard_of, weights=sizes)


def balance_row(shard_of, shard_bytes_each, replicas: int, seed: int) -> dict:
    order = ShardAffineOrder(shard_of, len(shard_bytes_each), LOCAL_BATCH * replicas, replicas, seed)
    shares = np.array([len(s) for s in order.shares])
    node_bytes = [shard_bytes_each[np.isin(order.owner, range(n, n + RANKS_PER_NODE))].sum()
                  for n in range(0, replicas, RANKS_PER_NODE)]
    return {
        "shards": len(shard_bytes_each), "replicas": replicas,
        "share_min": int(shares.min()), "share_max": int(shares.max()),
        "waiting_pct": 100.0 * order.dropped_per_epoch() / len(shard_of),
        "coverage_epochs": math.ceil(shares.max() / order.used),
        "node_gb": max(node_bytes) / 1e9, "global_node_gb": shard_bytes_each.sum() / 1e9,
    }


def timed(function, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--shard-size", type=float, nargs="+", default=[1e9, 256e6, 64e6], help="bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load = OtherLoad()
    rows = []
    print(f"shard_affine on a modelled pack of {args.images:,} images (median 100 kB), "
          f"{LOCAL_BATCH} images per replica per step, {RANKS_PER_NODE} replicas per node")
    print(f"{'shard size':>10} {'shards':>7} {'replicas':>8} {'share min..max':>17} "
          f"{'waiting/epoch':>13} {'all read within':>15} {'node stages':>11} {'global order':>12}")
    for shard_size in args.shard_size:
        shard_of, shard_bytes_each = modelled_pack(args.images, int(shard_size), args.seed)
        for replicas in args.replicas:
            if replicas > len(shard_bytes_each):
                print(f"{shard_size / 1e6:>8.0f}MB {len(shard_bytes_each):>7} {replicas:>8}  "
                      "refused: fewer shards than replicas")
                continue
            row = balance_row(shard_of, shard_bytes_each, replicas, args.seed)
            row["shard_mb"] = shard_size / 1e6
            rows.append(row)
            print(f"{row['shard_mb']:>8.0f}MB {row['shards']:>7} {replicas:>8} "
                  f"{row['share_min']:>8}..{row['share_max']:<8} {row['waiting_pct']:>12.2f}% "
                  f"{row['coverage_epochs']:>9} epochs {row['node_gb']:>8.1f} GB {row['global_node_gb']:>9.1f} GB")

    # Cost of the order: a new epoch's batches (what the loader computes at each epoch start).
    shard_of, shard_bytes_each = modelled_pack(args.images, int(args.shard_size[0]), args.seed)
    replicas = args.replicas[0]
    batch = LOCAL_BATCH * replicas
    built = {}
    build = timed(lambda: built.__setitem__("o", ShardAffineOrder(shard_of, len(shard_bytes_each), batch, replicas, args.seed)), 1)
    affine = built["o"]
    global_order = SampleOrder(args.images, batch, args.seed)
    epoch = [0]

    def first_batch(order):
        epoch[0] += 1
        order.global_batch(epoch[0] * order.per_epoch)  # a new epoch: the whole shuffle

    t_affine = timed(lambda: first_batch(affine))
    t_global = timed(lambda: first_batch(global_order))
    other = load.cores()
    print(f"\nnew epoch's order, {args.images:,} images, {replicas} replicas: shard_affine "
          f"{t_affine:.3f} s, global {t_global:.3f} s (ratio {t_affine / t_global:.2f}x); "
          f"building the assignment once: {build:.3f} s")
    print(f"(shared machine: other processes used {other:.2f} cores meanwhile)" if other is not None
          else "(load of other processes unknown)")
    if args.json:
        print(json.dumps({"rows": rows, "epoch_s": {"shard_affine": t_affine, "global": t_global},
                          "build_s": build, "other_cores": other}))


if __name__ == "__main__":
    main()
