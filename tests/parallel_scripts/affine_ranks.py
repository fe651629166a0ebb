"""One rank of the shard-affine test, under torchrun: ``affine_ranks.py SHARDS OUT``.

Each rank (one data-parallel replica) streams packed shards with ``data.order:
shard_affine`` and
1. stages into its own directory ``OUT/node<R>`` (as if each rank were alone on a node,
   which is what the stage directory's (host, directory) grouping sees) with
   ``stage_wait``, and reads three whole epochs, recording the image of every example and
   the shard of every example it read;
2. stages again into one directory ``OUT/shared`` that both ranks share (two ranks on one
   node), recording which shards this rank copied;
3. trains a small RICA for STEPS steps with a DCP checkpoint at CHECKPOINT_AT (mid-epoch),
   then a fresh trainer + stream restore it and train to the end.
Writes ``OUT/rank<R>.json``; the test compares ranks, epochs and sessions.
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
from terabrain.data.catalogs import ShardCatalog  # noqa: E402
from terabrain.parallel.parallelism import Parallelism  # noqa: E402
from terabrain.train.checkpoint import CheckpointManager  # noqa: E402

BATCH, STEPS, CHECKPOINT_AT, EPOCHS = 8, 7, 3, 3


def config(shards: Path, stage: Path):
    return data_config(source="shards", root=shards, order="shard_affine", crop_size=16,
                      remove_mean=False, whitening="none", holdout_patches=2, workers=2,
                      stage_dir=stage, stage_wait=True)


def staged_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*/*.tar"))


def main():
    shards, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo", 60)
        parallel = Parallelism(build_mesh(-1, 1, env))
        rank = dist.get_rank()

        own_node = out / f"node{rank}"
        source = StreamSource(config(shards, own_node), seed=0)
        stream = source.open(BATCH, parallel, torch.device("cpu"))
        order, catalog = stream.order, source.catalog
        staged = staged_names(own_node)  # stage_wait: complete before the first batch
        per_epoch = order.per_epoch
        epochs, shards_read = [], []
        for epoch in range(EPOCHS):
            steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
            epochs.append([image_id(r) for s in steps for r in stream.batch(s)[0].numpy()])
            shards_read.append(sorted({int(x) for s in steps for x in catalog.shards_of(stream.local_ids(s))}))
        mine = [catalog.tables[s].path.name for s in order.shards_of(rank)]
        stream.close()
        source.close()

        shared = StreamSource(config(shards, out / "shared"), seed=0)
        shared_stream = shared.open(BATCH, parallel, torch.device("cpu"))
        copied = [shared.catalog.tables[s].path.name for s in shared.stager.mine]
        shared_stream.close()
        shared.close()
        dist.barrier()  # both ranks' copies are complete before the test looks

        manager = CheckpointManager(out / "checkpoints")
        sessions = interrupted_and_resumed(
            lambda: source.open(BATCH, parallel, torch.device("cpu")), manager, steps=STEPS,
            checkpoint_at=CHECKPOINT_AT, batch_size=BATCH, parallel=parallel)
        source.close()

        # Held-out set and whitening sample from this replica's own shards: record which
        # shards the start-up reads touched, and what every rank agreed on.
        touched = []
        read = ShardCatalog.read

        def recording(catalog, index):
            touched.append(catalog.shard_of(index)[0])
            return read(catalog, index)

        ShardCatalog.read = recording
        whitened = StreamSource(data_config(source="shards", root=shards, order="shard_affine", crop_size=16,
                                            image_size=8, whitening="zca", holdout_patches=4, workers=2),
                                seed=0, replicas=parallel.data)
        ShardCatalog.read = read
        whitened_order = whitened.open(BATCH, parallel, torch.device("cpu")).order
        startup = {
            "touched": sorted(set(touched)), "owned": whitened_order.shards_of(rank).tolist(),
            "holdout_ids": whitened.holdout_ids.tolist(), "train_ids": whitened.train_ids.tolist(),
            "holdout_rows": len(whitened.holdout_x),
            "zca": [float(whitened.whitening.matrix.sum()), float(whitened.whitening.mean.sum())],
        }
        whitened.close()
        result = {
            "startup": startup,
            "rank": rank, "per_epoch": per_epoch, "used": order.used, "owned": mine,
            "owned_indices": order.shards_of(rank).tolist(), "staged": staged,
            "copied_to_shared": copied, "epochs": epochs, "shards_read": shards_read,
            "train_ids": source.train_ids.tolist(),
            **sessions,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        print(f"rank {rank}: done")
        shutdown_distributed()


if __name__ == "__main__":
    main()
