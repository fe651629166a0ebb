"""terabrain calibrate on one node of 4 ranks also measures the links (and a model-parallel
evaluation's dispatch) of the first 2 ranks alone, as a 2-rank run has them: rank 0 gets the
2-rank links, the other ranks nothing, and ranks 2 and 3 wait without computing meanwhile
(blocked, not spinning: they would otherwise take the cores the 2 ranks are measured on).

Run under torchrun with 4 ranks; prints "rank R: ok ..." or what was measured.
"""

import time

import torch
import torch.distributed as dist

from terabrain.capacity.calibrate import (
    COLLECTIVES, measure_sharded_evaluation, measure_smaller_groups, smaller_group_sizes,
)

dist.init_process_group("gloo")
rank, device = dist.get_rank(), torch.device("cpu")
problems = []
if smaller_group_sizes(4, 4) != [2] or smaller_group_sizes(8, 8) != [2, 4] \
        or smaller_group_sizes(4, 2) != [] or smaller_group_sizes(2, 2) != []:
    problems.append("group sizes")
cpu, wall = time.process_time(), time.perf_counter()
smaller = measure_smaller_groups(device, [64, 4096, 65536], local=4)
busy = (time.process_time() - cpu) / (time.perf_counter() - wall)
if rank == 0:
    if sorted(smaller) != [2] or sorted(smaller[2]) != sorted(COLLECTIVES):
        problems.append(f"rank 0 measured {sorted(smaller)}")
    elif not all(smaller[2][c]["bandwidth"] > 0 and "sync_s" in smaller[2][c] for c in COLLECTIVES):
        problems.append(f"links {smaller[2]}")
elif smaller:
    problems.append(f"rank {rank} kept {sorted(smaller)}")
if rank >= 2 and busy > 0.25:
    problems.append(f"waiting rank busy {busy:.2f} CPU s per s")
link = {"alpha_s": 1e-4, "bandwidth": 1e9, "sync_s": 0.0}
evaluation = measure_sharded_evaluation(device, link, repeats=2, ranks=2)
if rank >= 2 and evaluation != 0.0:  # not in the group: nothing measured
    problems.append(f"evaluation {evaluation}")
dist.barrier()
print(f"rank {rank}: " + ("ok" if not problems else "; ".join(problems))
      + f" (busy {busy:.2f}, evaluation {evaluation * 1e3:.2f} ms)", flush=True)
dist.destroy_process_group()
