"""One rank of the streamed-data test, under torchrun: ``stream_ranks.py COLLECTION OUT``.

Each rank streams its share of an image folder (data-parallel over all ranks) and
1. reads two whole epochs, recording which image every decoded example shows;
2. trains a small RICA for STEPS steps with a DCP checkpoint at CHECKPOINT_AT (mid-epoch),
   then a fresh trainer + stream restore that checkpoint and train to the end, recording
   the examples of every step in both sessions.
Writes ``OUT/rank<R>.json``; the test compares ranks and sessions.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from collections_for_tests import image_id, interrupted_and_resumed  # noqa: E402

from terabrain.data.sources import data_config  # noqa: E402
from terabrain.data.streamed_source import StreamSource  # noqa: E402
from terabrain.parallel import (  # noqa: E402
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism  # noqa: E402
from terabrain.train.checkpoint import CheckpointManager  # noqa: E402

BATCH, STEPS, CHECKPOINT_AT = 8, 7, 4


def main():
    collection, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo", 60)
        parallel = Parallelism(build_mesh(-1, 1, env))
        rank = dist.get_rank()
        config = data_config(source="folder", root=collection, crop_size=16, remove_mean=False,
                            whitening="none", holdout_patches=2, workers=2)
        source = StreamSource(config, seed=0)
        stream = source.open(BATCH, parallel, torch.device("cpu"))
        per_epoch = stream.order.per_epoch
        epochs = [[image_id(r) for s in range(e * per_epoch, (e + 1) * per_epoch)
                   for r in stream.batch(s)[0].numpy()] for e in range(2)]
        metrics = stream.metrics()
        stream.close()

        manager = CheckpointManager(out / "checkpoints")
        sessions = interrupted_and_resumed(
            lambda: source.open(BATCH, parallel, torch.device("cpu")), manager, steps=STEPS,
            checkpoint_at=CHECKPOINT_AT, batch_size=BATCH, parallel=parallel)
        result = {
            "rank": rank, "per_epoch": per_epoch, "epochs": epochs, "metrics": metrics,
            "train_ids": source.train_ids.tolist(), "holdout_ids": source.holdout_ids.tolist(),
            **sessions,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        print(f"rank {rank}: done")
        shutdown_distributed()


if __name__ == "__main__":
    main()
