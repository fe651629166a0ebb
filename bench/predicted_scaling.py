#!/usr/bin/env python
"""Predicted (not measured) scaling from `terabrain plan --profile`: strong and weak scaling
to 1,024 GPUs of lbann-ae-400k and yfcc-15b on H100 nodes (pictures in docs/img/), and the
seeds' own configurations on their own machines beside what the seeds report.

Every figure is the planner's: for each GPU count, the recommended split (the fastest that
fits in 80 GB with the default headroom) of the experiment on the built-in profile. Strong
scaling keeps the global batch (the experiment's); weak scaling grows it with the GPU count
from the smallest count that fits (batch x GPUs / first GPUs).

    python bench/predicted_scaling.py              # tables + docs/img/predicted-*.png
    python bench/predicted_scaling.py --no-plots
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from terabrain.capacity.planner import plan_experiment  # noqa: E402
from terabrain.capacity.profile import load_profile  # noqa: E402
from terabrain.capacity.timing import predict, read_seconds  # noqa: E402
from terabrain.config.loader import load_experiment  # noqa: E402
from terabrain.learners.registry import learner_of  # noqa: E402
from terabrain.units import format_count, format_seconds  # noqa: E402

GPUS = [2**k for k in range(0, 11)]  # 1 ... 1,024


def best(config, gpus: int, profile, batch=None):
    plan = plan_experiment(config, gpus, profile.device_memory, profile=profile, batch=batch)
    return plan, plan.recommended


def curves(name: str, profile) -> dict:
    config = load_experiment(name, [])
    strong, weak = [], []
    first = None
    for gpus in GPUS:
        plan, split = best(config, gpus, profile)
        if split is None:
            continue
        first = first or (gpus, plan.batch)
        strong.append((gpus, split.images_per_s, split, plan.batch))
    if first is None:
        return {"strong": [], "weak": []}
    base_gpus, base_batch = first
    for gpus in GPUS:
        if gpus < base_gpus:
            continue
        batch = base_batch * gpus // base_gpus
        plan, split = best(config, gpus, profile, batch=batch)
        if split is not None:
            weak.append((gpus, split.images_per_s, split, batch))
    return {"strong": strong, "weak": weak}


def print_curve(title: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"{'GPUs':>6}{'batch':>8}{'split':>10}{'step':>10}{'compute':>10}{'exposed':>10}"
          f"{'images/s':>11}{'per GPU':>9}{'efficiency':>11}")
    base = rows[0] if rows else None
    for gpus, rate, split, batch in rows:
        efficiency = (rate / gpus) / (base[1] / base[0])
        print(f"{gpus:>6}{batch:>8}{f'{split.data}x{split.model}':>10}"
              f"{format_seconds(split.step_time_s):>10}{format_seconds(split.compute_s):>10}"
              f"{format_seconds(split.exposed_s):>10}{rate:>11,.0f}{rate / gpus:>9,.1f}"
              f"{efficiency:>11.0%}")


def plot(name: str, data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("strong", "weak")):
        rows = data[kind]
        if not rows:
            continue
        gpus = [r[0] for r in rows]
        rates = [r[1] for r in rows]
        ax.loglog(gpus, rates, "o-", label="predicted (recommended split)")
        ax.loglog(gpus, [rates[0] * g / gpus[0] for g in gpus], "k--", lw=0.8, label="linear")
        for g, r, split, _ in rows:
            ax.annotate(f"{split.data}x{split.model}", (g, r), fontsize=6,
                        textcoords="offset points", xytext=(3, -9))
        ax.set_xlabel("H100 GPUs (8 per node)")
        ax.set_ylabel("images/s")
        batch = "fixed batch" if kind == "strong" else "batch grows with GPUs"
        ax.set_title(f"{name}: {kind} scaling ({batch})", fontsize=9)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("predicted by terabrain plan --profile h100-sxm (not measured); labels: "
                 "data x model", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out.relative_to(REPO)}")


# --- the seeds -----------------------------------------------------------------------------


def seed_000() -> None:
    """Ni et al. 2015: yfcc-15b on 98 Edge nodes, model parallel, mini-batches of 192."""
    edge = load_profile("llnl-edge")
    config = load_experiment("yfcc-15b", [])
    plan = plan_experiment(config, 98, edge.device_memory, profile=edge)
    split = next(s for s in plan.splits if (s.data, s.model) == (1, 98))
    images = 99_207 * 960
    print("\nseed 000: yfcc-15b, 98 Edge nodes (1 x 98: model parallel, as the seed), batch 192")
    print(f"  terabrain's row split cannot run 1 x 98 ({split.reason}); the seed split fields "
          "in 2-D blocks. The model's figures for 98 ranks each holding 1/98 of every layer:")
    print(f"  memory per GPU {split.total / 1e9:.1f} GB against the M2050's 3 GB")
    work = learner_of(config).capacity(config, (300, 300, 3)).work(1, 98, 192)
    time = predict(edge, work, 1, 98, gpus_per_node=1)
    rate = 192 / time.step_s
    print(f"  predicted step {format_seconds(time.step_s)} (compute "
          f"{format_seconds(time.compute_s)}, exposed communication "
          f"{format_seconds(time.exposed_s)}), {rate:,.0f} images/s")
    print(f"  one pass over 99,207 blocks x 960 = {images / 1e6:.1f} M images with all three "
          f"layers training: {format_seconds(images / rate)}; the seed: 8 days on 98 nodes "
          "(layer-wise, pipelined; it does not say how many passes)")


def seed_003() -> None:
    """Coates et al. 2013: 11.2B on 64 GPUs updates in about the time of 185M on one."""
    cots = load_profile("cots-hpc")
    big = load_experiment("cots-11b", [])
    plan = plan_experiment(big, 64, cots.device_memory, profile=cots)
    fastest = min((s for s in plan.splits if s.step_time_s is not None),
                  key=lambda s: s.step_time_s)
    chosen = plan.recommended or fastest
    what = "recommended" if plan.recommended else "fastest (none fits in 4 GB)"
    # The 185M network: the same three layers with fewer maps (the seed gives no architecture).
    candidates = []
    for maps in range(4, 30):
        layers = [{**layer.model_dump(mode="json", exclude_none=True), "maps": maps}
                  for layer in big.model.layers]
        config = load_experiment("cots-11b", [f"model.layers={json.dumps(layers)}"])
        parameters = learner_of(config).capacity(config, (200, 200, 3)).parameters
        candidates.append((abs(math.log(parameters / 185e6)), maps, parameters, config))
    _, maps, parameters, small = min(candidates, key=lambda c: c[0])
    one = plan_experiment(small, 1, cots.device_memory, profile=cots).splits[0]
    print(f"\nseed 003: cots-11b ({format_count(plan.parameters)} parameters) on 64 GTX 680s "
          "(16 servers x 4)")
    print(f"  {what} {chosen.data}x{chosen.model}: step {format_seconds(chosen.step_time_s)}"
          f" ({'fits' if chosen.fits else 'does not fit'} in 4 GB; compute "
          f"{format_seconds(chosen.compute_s)}, exposed {format_seconds(chosen.exposed_s)})")
    print(f"  the same layers with {maps} maps ({format_count(parameters)} parameters) on 1 GPU: "
          f"step {format_seconds(one.step_time_s)} ({one.status})")
    ratio = chosen.step_time_s / one.step_time_s
    throughput = (plan.parameters / chosen.step_time_s) / (parameters / one.step_time_s)
    print(f"  11.2B on 64 / 185M on 1: step time x{ratio:.2f} (the seed: 'similar'); "
          f"parameters x examples per second x{throughput:.0f} (the seed: up to 47x; it does "
          "not define throughput in the text)")


def seed_001() -> None:
    """Van Essen et al. 2015: lbann-ae-50k strong scaling on 8 -> 128 Catalyst nodes."""
    catalyst = load_profile("llnl-catalyst")
    # 49,152 hidden units (~ the seed's 50K) divide over 96 ... 1,536 ranks (12 per node).
    config = load_experiment("lbann-ae-50k", ["model.hidden=49152"])
    capacity = learner_of(config).capacity(config, (256, 256, 3))
    print("\nseed 001: lbann-ae-50k (49,152 hidden), Catalyst, 12 ranks per node, model "
          "parallel, batch 40 read from node-local NVRAM each step")
    print(f"{'nodes':>7}{'compute':>10}{'exposed':>10}{'read':>10}{'step':>10}{'speed-up':>10}")
    first = None
    for nodes in (8, 16, 32, 64, 128):
        ranks = 12 * nodes
        work = capacity.work(1, ranks, 40)
        time = predict(catalyst, work, 1, ranks, gpus_per_node=12)
        read = read_seconds(catalyst, 40, ("pixels", 196_608), 12)
        step = time.compute_s + time.exposed_s + read  # CPU nodes: readers share the cores
        first = first or step
        print(f"{nodes:>7}{format_seconds(time.compute_s):>10}{format_seconds(time.exposed_s):>10}"
              f"{format_seconds(read):>10}{format_seconds(step):>10}{first / step:>10.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    h100 = load_profile("h100-sxm")
    for name in ("lbann-ae-400k", "yfcc-15b"):
        data = curves(name, h100)
        print_curve(f"{name} on H100 nodes, strong scaling (batch fixed)", data["strong"])
        print_curve(f"{name} on H100 nodes, weak scaling (batch grows with GPUs)", data["weak"])
        if not args.no_plots:
            plot(name, data, REPO / "docs" / "img" / f"predicted-scaling-{name}.png")
    seed_000()
    seed_003()
    seed_001()
    return 0


if __name__ == "__main__":
    sys.exit(main())
