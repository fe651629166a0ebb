"""What each rank held at its peak, recorded in ``results.json`` under ``memory``.

Why it is recorded: ``terabrain plan`` predicts the peak per rank before a run; a user (and
``bench/plan_memory.py``) compares that with what the run measured. The host figure is the
kernel's high-water mark of the resident set (``VmHWM``), so it counts everything the process
held, the interpreter and libraries included; the device figure is PyTorch's CUDA allocator
peak. Rank 0 gathers them with one small collective at the end of the run.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def peak_resident_bytes() -> int:
    """This process's peak resident set size, in bytes."""
    status = Path("/proc/self/status")
    if status.exists():  # Linux: VmHWM is exact and in kB
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux and BSD


def peak_device_bytes(device: torch.device) -> int | None:
    """The CUDA allocator's peak on ``device``; None for the CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def peak_memory_by_rank(device: torch.device) -> dict[str, Any]:
    """Each rank's peaks, in rank order (one entry for a single process). A collective when
    torch.distributed is initialised: every rank calls it."""
    mine = (peak_resident_bytes(), peak_device_bytes(device))
    if dist.is_initialized():
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    result: dict[str, Any] = {"peak_resident_bytes": [host for host, _ in everyone]}
    if device.type == "cuda":
        result["peak_device_bytes"] = [on_device for _, on_device in everyone]
    return result
