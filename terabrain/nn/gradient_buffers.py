"""A large weight's gradient written into the same memory at every step.

The functions that compute a weight's gradient themselves (terabrain.nn.shared_weight) used
to write it into a new buffer at every backward pass, which autograd stores as
``parameter.grad`` and the optimizer's ``zero_grad`` frees. terabrain maps every buffer
above 1 MB on its own (terabrain.train.malloc: freed batch-sized tensors leave the resident
set), so each new gradient's pages fault in again, one 4 KB page at a time, and the free
unmaps them: for the 1,024 x 3,072 weight of ``lbann-ae-small`` 5 ms of a 23 ms step went
to faulting in its 12.6 MB and 1.2 ms to unmapping it (torch.profiler, docs/scaling.md).

Here each weight keeps the memory of its last gradient and the next gradient is written
into it, but only when nothing else refers to that memory any more: the optimizer has set
``.grad`` to None and no tensor, view or pending collective holds it (its storage's use
count is this module's one reference). Otherwise a new buffer is made, exactly as before,
and kept for the step after. The peak is unchanged (the gradient exists during every step
anyway); between steps the memory stays mapped instead of being returned.
"""

from __future__ import annotations

from typing import Optional

import torch

from terabrain.nn.parameter_table import ParameterTable

_use_count = getattr(torch._C, "_storage_Use_Count", None)
"""The number of references to a storage (tensors, views, storages). Private in torch; where
a version lacks it, nothing is reused."""


class GradientBuffer:
    """The memory of one weight's last gradient (an untyped storage), handed out again once
    nothing else refers to it."""

    def __init__(self):
        self._storage: Optional[torch.UntypedStorage] = None
        self.reused = 0
        """How many gradients were written into the kept memory (for tests and benchmarks)."""

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor shaped like ``like``: the kept memory when it is
        free and of the right size and device, else new memory (then kept)."""
        storage = self._storage
        nbytes = like.numel() * like.element_size()
        if (storage is not None and _use_count is not None and storage.device == like.device
                and storage.nbytes() == nbytes and _use_count(storage._cdata) == 1):
            self.reused += 1
            return torch.empty(0, dtype=like.dtype, device=like.device).set_(
                storage, 0, like.shape)
        gradient = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._storage = gradient.untyped_storage()
        return gradient


_buffers: ParameterTable[GradientBuffer] = ParameterTable()


def buffer_for(weight: torch.Tensor) -> Optional[GradientBuffer]:
    """The gradient buffer of ``weight`` (called in the forward pass, where ``weight`` is the
    parameter itself), or None where its gradient is better left to a new buffer: a weight
    that is not a plain leaf tensor (a DTensor shard, a computed weight) or needs no grad."""
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or not (
            weight.is_leaf and weight.requires_grad):
        return None
    buffer = _buffers.get(weight)
    if buffer is None:
        buffer = GradientBuffer()
        _buffers.set(weight, buffer)
    return buffer


def new_gradient(like: torch.Tensor, buffer: Optional[GradientBuffer]) -> torch.Tensor:
    """An uninitialised contiguous gradient for ``like``: from ``buffer`` where there is one."""
    if buffer is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return buffer.take(like)
