"""One rank of the real-launcher test, under srun or mpirun: ``launcher_layout.py SHARDS OUT``.

The rank reads its place from the launcher's variables (``detect_launch_env``), joins the
gloo process group, and stages a packed collection into a stage directory that every rank of
the host shares, twice: with the global order (the copying divided by local rank and local
world size) and with the shard-affine order (ranks grouped by host, ``LaunchEnv.node``). The
``StreamSource`` is given no launcher: it must find the same one by itself. Writes
``OUT/rank<R>.json`` with what it saw and which shards it copied; the test compares ranks.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from terabrain.data.sources import data_config
from terabrain.data.streamed_source import StreamSource
from terabrain.parallel import (
    build_mesh, detect_launch_env, fail_fast, init_distributed, shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism

BATCH = 4


def main(shards: Path, out: Path) -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo", 60)
        parallel = Parallelism(build_mesh(-1, 1, env))
        record = {**dataclasses.asdict(env), "group_rank": dist.get_rank()}
        for order in ("global", "shard_affine"):
            config = data_config(source="shards", root=shards, order=order, crop_size=16,
                                remove_mean=False, whitening="none", holdout_patches=1, workers=1,
                                stage_dir=out / f"stage-{order}", stage_wait=True)
            source = StreamSource(config, seed=0)
            stream = source.open(BATCH, parallel, torch.device("cpu"))
            stream.batch(0)
            record[f"{order}_launch"] = dataclasses.asdict(source.launch)
            record[f"{order}_copied"] = sorted(source.catalog.tables[s].path.name
                                               for s in source.stager.mine)
            stream.close()
            source.close()
        dist.barrier()
        (out / f"rank{env.rank}.json").write_text(json.dumps(record))
        shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
