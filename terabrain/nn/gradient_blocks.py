"""A weight's gradient handed out block by block while the backward pass computes it.

Autograd makes a parameter's gradient visible only when the whole tensor is done, and for
the large weight of an autoencoder or RICA that is the last thing the backward pass
computes. Whoever must act on the gradient (the data-parallel exchange: start reducing it)
would then wait for the whole product. Here a listener registered for a parameter receives
each block of rows of its gradient as soon as that block is final, so it can start work on
block ``i`` while block ``i + 1`` is computed.

Model code stays free of parallelism: it only knows that someone may want the rows early.
The functions that compute a weight's gradient themselves (terabrain.nn.shared_weight) ask
:func:`listener_for` in the forward pass and, where there is one, compute the gradient
through :func:`fill_in_blocks`; without one they compute it as before, in one product.

The listener gets each block's rows and the whole gradient, as a detached alias of the
gradient and a view of it: they share the memory that autograd then stores as
``parameter.grad``, and hold no reference to the gradient tensor itself (a view of it would,
and autograd then stores a copy instead of the tensor, which would leave the listener
working on a buffer nobody reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from terabrain.nn.parameter_table import ParameterTable

BlockListener = Callable[[torch.Tensor, torch.Tensor], None]
"""Called with (the block's rows, the whole gradient), both detached aliases."""


@dataclass(frozen=True)
class Listening:
    listener: BlockListener
    block_bytes: int
    """Rows per block are chosen so that a block holds about this many bytes."""


_listening: ParameterTable[Listening] = ParameterTable()


def listen(parameter: torch.Tensor, listener: BlockListener, block_bytes: int) -> None:
    """Hand ``parameter``'s gradient to ``listener`` in blocks of about ``block_bytes``, in row
    order, each as soon as its rows are final (where the function computing it supports
    blocks; see :func:`supports_blocks`)."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    _listening.set(parameter, Listening(listener, block_bytes))


def forget(parameter: torch.Tensor) -> None:
    _listening.remove(parameter)


def listener_for(weight: torch.Tensor) -> Optional[Listening]:
    """The listening registered for ``weight`` (called in the forward pass, where ``weight``
    is the parameter itself), or None."""
    return _listening.get(weight) if supports_blocks(weight) else None


def supports_blocks(weight: torch.Tensor) -> bool:
    """Blocks are rows of a plain, contiguous, float32 matrix. A sharded (DTensor) weight is
    reduced whole: its local shard is already a fraction of the matrix."""
    return (type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.dim() == 2
            and weight.dtype == torch.float32 and weight.is_contiguous())


def block_rows(rows: int, row_bytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of about ``block_bytes`` each, covering ``rows``."""
    per_block = max(1, min(rows, block_bytes // max(1, row_bytes)))
    return [(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


def fill_in_blocks(gradient: torch.Tensor, listening: Listening,
                   fill: Callable[[torch.Tensor, int, int], None]) -> torch.Tensor:
    """``gradient`` (uninitialised, contiguous) filled block by block: ``fill(out, start,
    stop)`` writes the final rows ``[start, stop)`` into ``out`` (a view of those rows), and
    the listener gets them, with the whole gradient, right after."""
    alias = gradient.detach()
    row_bytes = gradient.stride(0) * gradient.element_size()
    for start, stop in block_rows(gradient.shape[0], row_bytes, listening.block_bytes):
        fill(gradient[start:stop], start, stop)
        listening.listener(alias[start:stop], alias)
    return gradient
