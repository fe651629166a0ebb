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
from collections_for_tests import image_id  # noqa: E402

from terabrain.config.schema import DataConfig, OptimizerConfig  # noqa: E402
from terabrain.data.streaming import StreamSource  # noqa: E402
from terabrain.nn.autoencoder import RICA  # noqa: E402
from terabrain.objectives import RICAObjective  # noqa: E402
from terabrain.parallel import (  # noqa: E402
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism  # noqa: E402
from terabrain.train import callbacks as cb  # noqa: E402
from terabrain.train.checkpoint import CheckpointManager, restore  # noqa: E402
from terabrain.train.optim import build_optimizer  # noqa: E402
from terabrain.train.trainer import Trainer  # noqa: E402

BATCH, STEPS, CHECKPOINT_AT = 8, 7, 4


class Recorder:
    """The images of each step's batch, as the trainer received them."""

    def __init__(self):
        self.steps = {}


def trainer_for(stream, parallel, recorder, manager):
    model = RICA(16 * 16, 8, seed=3)
    optimizer = build_optimizer(OptimizerConfig(name="adam", lr=0.01), model.parameters())
    trainer = Trainer(model, RICAObjective(0.1, 0.01), optimizer, None, None, steps=STEPS,
                      batch_size=BATCH, seed=0, device=torch.device("cpu"), parallel=parallel,
                      callbacks=[cb.Checkpointing(manager, CHECKPOINT_AT)], batches=stream)
    original = trainer.batch

    def recording_batch(step):
        x, y = original(step)
        recorder.steps[step] = [image_id(row) for row in x.numpy()]
        return x, y

    trainer.batch = recording_batch
    return trainer


def main():
    collection, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo", 60)
        parallel = Parallelism(build_mesh(-1, 1, env))
        rank = dist.get_rank()
        config = DataConfig(source="folder", root=collection, crop_size=16, remove_mean=False,
                            whitening="none", holdout_patches=2, workers=2)
        source = StreamSource(config, seed=0)
        stream = source.open(BATCH, parallel, torch.device("cpu"))
        per_epoch = stream.order.per_epoch
        epochs = [[image_id(r) for s in range(e * per_epoch, (e + 1) * per_epoch)
                   for r in stream.batch(s)[0].numpy()] for e in range(2)]
        metrics = stream.metrics()
        stream.close()

        manager = CheckpointManager(out / "checkpoints")
        first, second = Recorder(), Recorder()
        trainer = trainer_for(source.open(BATCH, parallel, torch.device("cpu")), parallel, first, manager)
        trainer.steps = CHECKPOINT_AT  # the "killed" session stops right after its checkpoint
        trainer.fit()
        resumed = trainer_for(source.open(BATCH, parallel, torch.device("cpu")), parallel, second, manager)
        restore(manager.latest(), resumed)
        start = resumed.step
        resumed.fit()
        result = {
            "rank": rank, "per_epoch": per_epoch, "epochs": epochs, "metrics": metrics,
            "train_ids": source.train_ids.tolist(), "holdout_ids": source.holdout_ids.tolist(),
            "first": {str(k): v for k, v in first.steps.items()},
            "second": {str(k): v for k, v in second.steps.items()}, "resumed_at": start,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        print(f"rank {rank}: done")
        shutdown_distributed()


if __name__ == "__main__":
    main()
