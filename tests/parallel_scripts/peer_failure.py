"""One rank of the peer-failure test, started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

`peer_failure.py FAILING_RANK exit|hang TIMEOUT_S`: after the process group forms, the failing
rank either exits at once with code 3 or hangs without ever joining the collective; every other
rank runs an all-reduce, which must fail (closed connection, or the timeout), so that fail_fast
ends it with `terabrain: rank R failed: ...`.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from terabrain.parallel import detect_launch_env, fail_fast, init_distributed


def main(failing_rank: int, how: str, timeout_s: float) -> None:
    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, timeout_s=timeout_s)
        print(f"rank {env.rank}: joined", flush=True)
        if env.rank == failing_rank:
            if how == "exit":
                os._exit(3)
            time.sleep(3600)  # alive but stuck; the test kills it
        value = torch.ones(1)
        dist.all_reduce(value)
        print(f"rank {env.rank}: all-reduce unexpectedly succeeded", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
