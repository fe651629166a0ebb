"""One rank of the parallel-analysis test, run under torchrun: top-k statistics and a
features file over a fixed data set, each rank taking its slice of the examples.

Usage: analysis_ranks.py OUT_DIR. Rank 0 writes OUT_DIR/stats.pt (top-k values, indices,
mean, std, count); write_features writes OUT_DIR/features.npy from every rank.
"""

import sys
from pathlib import Path

import torch

from terabrain.analysis.features import write_features
from terabrain.analysis.topk import neuron_stats
from terabrain.parallel import detect_launch_env, fail_fast, init_distributed, shutdown_distributed


def fixture():
    """The model and data the test computes on one process too."""
    from terabrain.nn.autoencoder import RICA

    model = RICA(36, 10, seed=3).eval()
    x = torch.randn(203, 36, generator=torch.Generator().manual_seed(8))
    x[150] = x[20]  # a tie across the two ranks' slices
    return model, x


def main(out: Path) -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo", timeout_s=60)
        model, x = fixture()
        stats = neuron_stats(model, x, k=5, batch_size=16)
        write_features(model, x, out / "features.npy", batch_size=16)
        if env.rank == 0:
            torch.save({"values": stats.top_values, "indices": stats.top_indices,
                        "mean": stats.mean(), "std": stats.std(), "count": stats.count},
                       out / "stats.pt")
        shutdown_distributed()
    print(f"rank {env.rank}: done", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
