"""The all-reduces of one data-parallel training step with parallel.overlap, counted call by
call on each rank, against the calls the planner charges for that step (terabrain.capacity.
work.gradient_exchange: each started block or tensor pays the link's alpha, and the logged
values' all-reduce after the backward pass is a call the step waits for).

Run under torchrun with 2 ranks: python overlap_calls.py OUT_DIR EXPERIMENT [SET ...]
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

COUNTED_STEP = 3  # after the first (learning) pass; not a logged step
counted = collections.Counter()
state = {"steps": 0}
all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    if state["steps"] == COUNTED_STEP:
        counted["blocking" if not kwargs.get("async_op") else "started"] += 1
    return all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce
train_step = trainer_module.Trainer.train_step


def counted_step(self, x, y):
    state["steps"] += 1
    return train_step(self, x, y)


trainer_module.Trainer.train_step = counted_step

out, experiment, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
sets = sets + ["parallel.data=2", "parallel.model=1", "train.steps=5", "train.log_every=100",
               "train.checkpoint_every=100", "train.progress=false"]
code = main(["train", experiment, "--out", out] + [a for s in sets for a in ("--set", s)])
if code:
    sys.exit(code)

config = load_experiment(experiment, sets)
shape, _ = data_shape(config)
work = learner_of(config).capacity(config, shape).work(2, 1, config.train.batch_size // 2)
planned = collections.Counter()
for transfer in work.transfers:
    if transfer.collective == "all_reduce" and transfer.axis in ("data", "world"):
        planned["started" if transfer.overlapped else "blocking"] += transfer.count
rank = int(os.environ["RANK"])  # the run has closed its process group
if dict(counted) == dict(planned):
    print(f"rank {rank}: ok {dict(counted)}", flush=True)
else:
    print(f"rank {rank}: counted {dict(counted)}, planned {dict(planned)}", flush=True)
