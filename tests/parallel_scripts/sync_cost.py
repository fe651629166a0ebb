"""terabrain calibrate's measure of what a blocking call costs inside a step (Link.sync_s)
sees a cost that every call pays: measured as it is, then with every all-reduce made 10 ms
slower on every rank, the all-reduce's figure grows by about those 10 ms (and the point-to-
point one, whose calls were not slowed, by much less).

Run under torchrun with 2 ranks; prints "rank R: ok ..." or what was measured.
"""

import time

import torch
import torch.distributed as dist

from terabrain.capacity.calibrate import measure_synchronization

DELAY_S = 10e-3
dist.init_process_group("gloo")
links = {c: {"alpha_s": 1e-4, "bandwidth": 1e9}
         for c in ("all_reduce", "all_gather", "reduce_scatter", "point_to_point")}
device = torch.device("cpu")
plain = measure_synchronization(device, links, seconds=0.2)
all_reduce = dist.all_reduce


def slowed(*args, **kwargs):
    time.sleep(DELAY_S)
    return all_reduce(*args, **kwargs)


dist.all_reduce = slowed
try:
    slow = measure_synchronization(device, links, seconds=0.2)
finally:
    dist.all_reduce = all_reduce
grown = slow["all_reduce"] - plain["all_reduce"]
other = slow["point_to_point"] - plain["point_to_point"]
verdict = "ok" if 0.7 * DELAY_S < grown < 1.6 * DELAY_S and other < 0.5 * DELAY_S else "wrong"
print(f"rank {dist.get_rank()}: {verdict} all-reduce {plain['all_reduce'] * 1e3:.2f} -> "
      f"{slow['all_reduce'] * 1e3:.2f} ms, point to point {plain['point_to_point'] * 1e3:.2f} -> "
      f"{slow['point_to_point'] * 1e3:.2f} ms", flush=True)
dist.destroy_process_group()
