"""The allocator policies of terabrain.train.malloc, measured in page faults: a released
buffer faults its pages in again each time it is allocated; a kept one is reused from the
heap. Each policy runs in its own process (mallopt lasts for the process)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

PAGES = 64 * 2**20 // 4096  # the 64 MB buffer: above glibc's largest own mmap threshold

CHILD = """
import resource, sys, torch
from terabrain.train import malloc
taken = {"keep": malloc.keep_freed_buffers, "release": malloc.map_large_buffers}[sys.argv[1]]()
faults = []
for _ in range(12):  # the heap settles over the first few rounds (alignment, consolidation)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    large = torch.empty(16 * 2**20).fill_(1.0)
    other = torch.empty(3 * 2**20).fill_(2.0)  # allocated above it, freed after it
    del large, other
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(taken, *faults)
"""


def faults_per_round(policy: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True,
                          text=True, timeout=120, check=True)
    taken, *faults = done.stdout.split()
    if taken != "True":
        pytest.skip("not glibc: mallopt unavailable")
    return [int(f) for f in faults]


def test_kept_buffers_are_reused_without_faults():
    assert max(faults_per_round("keep")[-4:]) < PAGES // 10


def test_released_buffers_fault_in_again_every_time():
    assert min(faults_per_round("release")[-4:]) >= PAGES
