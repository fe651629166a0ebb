"""The collectives of one pipelined training step of a deep network split over 2 model ranks,
counted call by call on each rank, against the calls the planner charges for that step
(terabrain.learners.deep_work: each call the ranks wait for costs Link.sync_s beyond its
bytes, so the count must be right, not only the bytes).

Run under torchrun with 2 ranks: python deep_split_collectives.py OUT_DIR
Prints "rank R: ok" or the difference.
"""

import collections
import os
import sys

import torch.distributed as dist

from terabrain.capacity.planner import data_shape
from terabrain.cli import main
from terabrain.config.loader import load_experiment
from terabrain.learners.registry import learner_of
from terabrain.train import trainer as trainer_module

LAYERS = ('[{"kind": "local", "maps": 4, "kernel": 8, "stride": 4, "sparsity_weight": 0.1, '
          '"lcn": {"kernel": 5}, "steps": 10}, '
          '{"kind": "local", "maps": 4, "kernel": 4, "stride": 1, "sparsity_weight": 0.1, '
          '"lcn": {"kernel": 5}, "steps": 10}, '
          '{"kind": "dense", "maps": 8, "sparsity_weight": 0.01, "steps": 10}]')
SETS = ["model.schedule=pipelined", "model.start_after=2", f"model.layers={LAYERS}",
        "data.num_patches=192", "data.holdout_patches=48", "train.batch_size=48",
        "train.steps=10", "train.log_every=100", "train.checkpoint_every=100",
        "train.progress=false", "parallel.model=2"]
COUNTED_STEP = 6  # every layer trains (they start at steps 0, 2 and 4); not a logged step

calls: collections.Counter = collections.Counter()
state = {"steps": 0}


def counting(kind, function):
    def counted(*args, **kwargs):
        if state["steps"] == COUNTED_STEP:
            calls[kind] += 1
        return function(*args, **kwargs)
    return counted


# The split network calls torch.distributed's functions through the module, so wrapping
# them here sees every call (a DTensor's functional collectives would not pass here: the
# deep split uses none).
for kind, name in (("all_reduce", "all_reduce"), ("all_gather", "all_gather"),
                   ("all_gather", "all_gather_into_tensor"),
                   ("reduce_scatter", "reduce_scatter_tensor"), ("broadcast", "broadcast"),
                   ("point_to_point", "batch_isend_irecv"), ("point_to_point", "send"),
                   ("point_to_point", "recv"), ("barrier", "barrier")):
    setattr(dist, name, counting(kind, getattr(dist, name)))

train_step = trainer_module.Trainer.train_step


def counted_step(self, x, y):
    state["steps"] += 1
    return train_step(self, x, y)


trainer_module.Trainer.train_step = counted_step

out = sys.argv[1]
code = main(["train", "yfcc-15b-small", "--out", out] + [a for s in SETS for a in ("--set", s)])
if code:
    sys.exit(code)

config = load_experiment("yfcc-15b-small", SETS)
shape, _ = data_shape(config)
work = learner_of(config).capacity(config, shape).work(1, 2, 48)
planned: collections.Counter = collections.Counter()
for transfer in work.transfers:
    if transfer.axis in ("model", "world"):  # one data rank: the world is the model axis
        planned[transfer.collective] += transfer.count
rank = int(os.environ["RANK"])  # the run has closed its process group
if dict(calls) == {k: v for k, v in planned.items() if v}:
    print(f"rank {rank}: ok {dict(calls)}", flush=True)
else:
    print(f"rank {rank}: counted {dict(calls)}, planned {dict(planned)}", flush=True)
