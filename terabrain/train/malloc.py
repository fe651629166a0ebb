"""Large buffers go back to the operating system when freed, where the model is large.

glibc's allocator serves a request from its heap unless it is larger than the mmap
threshold, and it raises that threshold (up to 32 MB) each time a mapped block is freed. A
training step allocates and frees batch-sized tensors of tens of megabytes; once the
threshold has risen they come from the heap, whose freed pages stay resident, and the
peak resident memory grows by a few of them. Fixing the threshold at 1 MB (``mallopt``,
which also turns the adjustment off) keeps every large tensor in its own mapping, returned
to the system on free. Measured on the tied 196,608 x 1,000 autoencoder: 1.4 B/parameter
less at the peak (docs/memory.md). Linux with glibc only; elsewhere this does nothing.

The price is a page fault per 4 KB each time such a buffer is allocated again, and the unmap
when it is freed. A small model's step allocates the same few buffers at every step, so the
price is paid at every step for a saving of a few MB: the deep network of
``bench/plan_accuracy.py`` (yfcc-15b-small's layers) stepped in 139 ms with the threshold
fixed and 53 ms without (its 18 MB patch copies faulted in five times a step). So
``train.release_freed_buffers: auto`` (the default) fixes the threshold only where the
model's floor (weights, gradient and one optimizer state) takes at least 1/64 of the
machine's memory: where the bytes matter more than the faults.

Elsewhere glibc's own reuse is not enough either. Its threshold rises only to 32 MB, and it
gives the top of its heap back to the system whenever 2 x threshold lies free there, so a
step whose tensors come and go in a different order each time still faults pages in. The
same deep network paid 88,000 page faults over its run with freed buffers kept and 136,000
to 268,000 with glibc's defaults, and stepped in 44-48 ms against 55-62 (four runs each,
alternated; docs/scaling.md). So where buffers are not released they are kept: the mmap and
trim thresholds are both raised to KEEP_BYTES, and every freed buffer below that is reused
from the heap, never unmapped. The resident set then stays at the run's high-water mark,
and the heap's own fragmentation adds to the peak: that run's peak resident set was 925 MB
against 873 MB, 6% more, a price a model that takes under 1/64 of memory can pay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from terabrain.parallel.parallelism import local

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20
KEEP_BYTES = 1 << 30
"""keep: buffers up to this size come from the heap and stay there once freed (mallopt takes
an int; a step of a model small enough to keep its buffers has none larger)."""
LARGE_MODEL_FRACTION = 1 / 64
"""auto: a model whose floor takes at least this fraction of physical memory is large."""
FLOOR_COPIES = 3
"""The floor of training: weights, their gradient and one optimizer state (SGD momentum)."""


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def releases_freed_buffers(setting: str, parameter_bytes: int,
                           memory: int | None = None) -> bool:
    """Whether to fix the mmap threshold for a model of ``parameter_bytes`` (this rank's):
    ``always``, ``never``, or ``auto`` (its floor is at least LARGE_MODEL_FRACTION of
    ``memory``, physical memory by default)."""
    if setting in ("always", "never"):
        return setting == "always"
    memory = physical_memory() if memory is None else memory
    if not memory:
        return True  # unknown memory: keep the lower peak
    return FLOOR_COPIES * parameter_bytes >= LARGE_MODEL_FRACTION * memory


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; returns whether all of them were taken."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return all([bool(libc.mallopt(option, value)) for option, value in settings.items()])
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def map_large_buffers(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold: every freed buffer above it goes back to the system."""
    return _mallopt({M_MMAP_THRESHOLD: threshold})


def keep_freed_buffers(limit: int = KEEP_BYTES) -> bool:
    """Keep freed buffers up to ``limit`` in the heap for reuse: neither mapped on their own
    nor trimmed off the heap's top."""
    return _mallopt({M_MMAP_THRESHOLD: limit, M_TRIM_THRESHOLD: limit})


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (a sharded parameter's local shard)."""
    return sum(t.numel() * t.element_size() for t in map(local, model.parameters()))


def apply_buffer_policy(setting: str, model: torch.nn.Module) -> str:
    """Release or keep freed buffers while training ``model`` (this rank's share of it) under
    ``train.release_freed_buffers``; returns which ("release" / "keep"). The setting lasts
    for the rest of the process (glibc cannot report its thresholds to restore them); each
    stage of a run applies its own before it trains."""
    if releases_freed_buffers(setting, local_parameter_bytes(model)):
        map_large_buffers()
        return "release"
    keep_freed_buffers()
    return "keep"
