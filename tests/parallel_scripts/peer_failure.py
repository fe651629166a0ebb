"""One rank of the peer-failure test, started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

`peer_failure.py FAILING_RANK exit|abort|hang TIMEOUT_S [all_reduce|dtensor|dtensor_backward]`:
after the process group forms, the failing rank either exits at once with code 3, aborts (as
the C++ runtime does on std::terminate, from a function named ``abort_like_the_runtime``),
or hangs without ever joining the collective; every other rank runs a collective, which must fail (closed
connection, or the timeout), so that fail_fast ends it with one line, `terabrain: rank R
failed: ...`. The collective: a plain all-reduce (default), DTensor's all-gather of a sharded
tensor (its collectives run as torch ops, not from torch.distributed's Python), or an
all-gather in DTensor's backward pass (run by autograd's engine).
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from terabrain.parallel import detect_launch_env, fail_fast, init_distributed


def abort_like_the_runtime() -> None:
    os.abort()


def main(failing_rank: int, how: str, timeout_s: float, collective: str) -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=timeout_s)
        if collective != "all_reduce":  # set up together, before the failure
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            shards = distribute_tensor(torch.ones(4 * mesh.size(), 2), mesh, [Shard(0)])
            shards.requires_grad_()
            if collective == "dtensor_backward":
                # Replicated to sharded: no communication forward, an all-gather backward.
                replicated = distribute_tensor(torch.ones(4, 2), mesh, [Replicate()])
                part = replicated.requires_grad_().redistribute(mesh, [Shard(0)]).to_local()
        print(f"rank {env.rank}: joined", flush=True)
        if env.rank == failing_rank:
            if how == "exit":
                os._exit(3)
            if how == "abort":
                abort_like_the_runtime()
            time.sleep(3600)  # alive but stuck; the test kills it
        if collective == "all_reduce":
            dist.all_reduce(torch.ones(1))
        elif collective == "dtensor":
            shards.redistribute(mesh, [Replicate()]).to_local()
        else:
            part.sum().backward()
        print(f"rank {env.rank}: all-reduce unexpectedly succeeded", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]),
         sys.argv[4] if len(sys.argv) > 4 else "all_reduce")
