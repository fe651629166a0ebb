"""Shared by the benchmarks: how busy the machine was while they measured."""

from __future__ import annotations

import os
import time
from pathlib import Path


class OtherLoad:
    """CPU time used by processes other than this one and its (waited-for) children, in
    cores, over an interval (Linux; None elsewhere). The machine may be shared: anything
    else running skews the timings, so the benchmarks report it beside their figures."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        mine = own.user + own.system + own.children_user + own.children_system
        return busy, mine, time.monotonic()

    def cores(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        busy, mine, wall = (b - a for a, b in zip(self.start, end))
        return max(busy - mine, 0.0) / wall
