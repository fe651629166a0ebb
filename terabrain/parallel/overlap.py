"""Data-parallel gradient averaging that starts during the backward pass (``parallel.overlap``).

The flat exchange (terabrain.parallel.exchange) waits for the whole backward pass, copies
every gradient into one buffer, all-reduces it, divides it into a second new buffer and
copies that back: on 2 ranks of a 2-core machine the all-reduce and the three copies of a
64 MiB gradient cost as much as a third of the step. Here each gradient is all-reduced in
place, asynchronously, as soon as it is final:

- the large weight of a tied autoencoder or RICA block by block, while the backward pass
  computes the next block (terabrain.nn.gradient_blocks; DDP's buckets cannot split one
  parameter, and here the weight is almost all of the gradient);
- every other parameter whole, from its post-accumulate-grad hook.

At the end of the backward pass the logged values (and any gradient not started) go in one
small all-reduce, the started ones are waited for and divided by the ranks in place.

A gradient may be reduced only once it is final, and autograd sums a parameter's
contributions (a weight used twice, weight decay through autograd) before or into the
parameter's gradient. So the first backward pass after ``watch`` takes the flat path and
learns the graph: how many contributions reach each parameter, and for a weight whose
function computes blocks, whether the buffer it filled is the one autograd stores (a
block listener that only records is attached for that pass). From the second pass on, such
a weight has its blocks reduced as they are computed, and every other parameter once its
last contribution has been added. A contribution that arrives after a reduction started
(the graph changed) stops the run with one line rather than averaging a buffer autograd is
still adding into; while blocks are in flight their storage is shared, so autograd sums
into a new buffer rather than into it, and the check sees a different buffer arrive.

Results equal the flat exchange's for 2 replicas bit for bit (the same fp32 sums, the same
division). With more replicas gloo's and NCCL's ring sums an element in an order that
depends on where the buffer is split, so they agree to rounding.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from terabrain.nn import gradient_blocks


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _address(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a gradient's values lie: (storage, first element), comparable across views."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


class GradientOrderError(RuntimeError):
    """A parameter got a gradient contribution after its reduction had started."""


class OverlappedAllReduce:
    def __init__(self, group: Optional[dist.ProcessGroup], size: int, block_bytes: int,
                 flat_all_reduce: Callable[[list[torch.Tensor]], None],
                 count_bytes: Callable[[int], None]):
        """``flat_all_reduce``: averages a list of tensors in place in one collective (the
        flat exchange's); ``count_bytes``: told the elements of each tensor reduced here."""
        self.group = group
        self.size = size
        self.block_bytes = block_bytes
        self.flat_all_reduce = flat_all_reduce
        self.count_bytes = count_bytes
        self.watched: dict[int, tuple[str, nn.Parameter]] = {}
        self.contributions: Optional[dict[int, int]] = None  # counted in the first pass
        self.arrived: Counter = Counter()
        self.started: dict[int, tuple[torch.Tensor, list]] = {}  # id -> (buffer, works)
        self.reset()

    # --- set-up -----------------------------------------------------------------------

    def watch(self, model: nn.Module) -> None:
        """Hook every trainable fp32 parameter of ``model`` (once; a later stage's model may
        share them). Other dtypes go through the flat path, which sums in fp32."""
        for name, parameter in model.named_parameters():
            key = id(parameter)
            if (not parameter.requires_grad or key in self.watched
                    or parameter.dtype != torch.float32):
                continue
            self.watched[key] = (name, parameter)
            parameter.register_hook(lambda grad, key=key: self._arriving(key, grad))
            parameter.register_post_accumulate_grad_hook(self._accumulated)
        self.reset()  # a new set of parameters: learn the graph again

    def reset(self) -> None:
        """Learn the graph again in the next backward pass (a new training stage's may
        differ): record where each blockwise weight's buffer goes."""
        self.contributions = None
        self.probes: dict[int, tuple[int, int]] = {}   # id -> the blocks' buffer, first pass
        self.stored_directly: set[int] = set()
        for key, (_, parameter) in self.watched.items():
            gradient_blocks.listen(parameter,
                                   lambda block, whole, key=key: self._probe(key, block, whole),
                                   self.block_bytes)
        self._clear()

    def _clear(self) -> None:
        self.arrived.clear()
        self.started.clear()
        self.probe_blocks: list[torch.Tensor] = []

    def _probe(self, key: int, block: torch.Tensor, whole: torch.Tensor) -> None:
        """First pass: where the blocks go (held until the pass ends, so that autograd,
        finding the storage shared, would sum into a new buffer as it will then)."""
        self.probes[key] = _address(whole)
        self.probe_blocks.append(block)

    # --- during the backward pass ---------------------------------------------------------

    def _arriving(self, key: int, grad: torch.Tensor) -> None:
        """Before autograd adds a contribution to the parameter's gradient: once its
        reduction has started, only the started buffer itself may still arrive (a weight's
        blocks are started before autograd stores them), once."""
        self.arrived[key] += 1
        if self.contributions is None:
            if self.probes.get(key) == _address(_local(grad)):
                self.stored_directly.add(key)
            return
        started = self.started.get(key)
        if started is None:
            return
        counted = self.contributions.get(key, 0)
        if _address(_local(grad)) == _address(started[0]) and self.arrived[key] <= counted:
            return
        raise GradientOrderError(
            f"parallel.overlap: parameter {self.watched[key][0]} got a gradient contribution "
            f"after its all-reduce had started (the first step had {counted}, summed by "
            "autograd); set parallel.overlap=false")

    def _accumulated(self, parameter: nn.Parameter) -> None:
        key = id(parameter)
        if self.contributions is None or key in self.started or parameter.grad is None:
            return
        if self.arrived[key] != self.contributions.get(key, 0):
            return
        gradient = _local(parameter.grad)
        if gradient.is_contiguous():
            self._start(key, gradient, gradient)

    def _start(self, key: int, piece: torch.Tensor, whole: torch.Tensor) -> None:
        """Start reducing ``piece`` of parameter ``key``'s gradient ``whole`` (a block of its
        rows, or all of it)."""
        if key not in self.started:
            self.started[key] = (whole, [])
        self.started[key][1].append(dist.all_reduce(piece, group=self.group, async_op=True))
        self.count_bytes(piece.numel())

    # --- after it -------------------------------------------------------------------------

    @torch.no_grad()
    def finish(self, gradients: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Average ``gradients`` (this rank's local ones) and ``values`` over the replicas, in
        place: the gradients not started in one collective with the values, then the
        started ones completed."""
        try:
            if self.contributions is None:
                self.flat_all_reduce(gradients + values)
                self._learn()
                return
            done = {_address(buffer): (buffer, works) for buffer, works in self.started.values()}
            rest = [g for g in gradients if _address(g) not in done]
            self.flat_all_reduce(rest + values)
            for buffer, works in done.values():
                for work in works:
                    work.wait()
                buffer.div_(self.size)
            for key, (buffer, _) in self.started.items():
                gradient = self.watched[key][1].grad
                if gradient is not None and _address(_local(gradient)) != _address(buffer):
                    _local(gradient).copy_(buffer)  # autograd kept a copy: give it the average
        finally:
            self._clear()

    def _learn(self) -> None:
        """After the first pass: how many contributions reach each parameter; a weight whose
        blocks were stored as its gradient, and nothing else, hands them out from now on."""
        self.contributions = dict(self.arrived)
        for key, (_, parameter) in self.watched.items():
            if key in self.stored_directly and self.contributions.get(key) == 1:
                gradient_blocks.listen(parameter,
                                       lambda block, whole, key=key: self._start(key, block, whole),
                                       self.block_bytes)
            else:
                gradient_blocks.forget(parameter)
