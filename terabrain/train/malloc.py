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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20
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


def map_large_buffers(threshold: int = THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold; returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
