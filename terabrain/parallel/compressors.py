"""Gradient compressors: what a rank sends instead of its fp32 gradient.

The interface is Horovod's, ``compress(tensor) -> (payload, ctx)`` and
``decompress(payload, ctx) -> tensor``, with two additions: every compressor declares the
collective its payload needs, and the error-feedback residual (what quantization left out,
carried to the next step) is kept per tensor by the exchange that drives it (see
``terabrain.parallel.exchange``).

Tensors are seen as matrices ``(shape[0], rest)`` and quantized by *column*: for a fully
connected weight ``(out, in)`` column ``j`` holds the weights leaving input ``j``; a 1-D tensor
is a single column (the exchange sends biases with ``PackedBfloat16`` instead, entry by entry). Per-column statistics (reconstruction values) follow that
layout, as in Seide et al. and Dryden et al. (Quantizing by row instead — one unit's weights
— trained the small autoencoder far worse with one-bit: its loss stalled near 300 where the
column layout reached the uncompressed 85 in 100 steps.)

The context holds only what every rank knows without being told (the column count and length,
dtype and device), so any rank can decompress any rank's payload. Bit-packed payloads are
int32 words; their float parts (reconstruction values) are bf16, two per word, bit for bit.

Why bf16 reconstruction values: in fp32 they cost 2 words per column beside the 32 words of
signs of a 1,024-entry column (in bf16, one word), and their rounding is absorbed by error feedback, since the
exchange computes each residual against what was actually decompressed (rounded values
included). bf16 rather than fp16 because it keeps fp32's exponent range: a column's mean of a
sum of gradients can exceed fp16's 65,504 (inf, then NaN everywhere) or fall below its
smallest subnormal (6e-8, flushed to zero), while bf16's coarser mantissa (relative error at
most 2^-8) is exactly the kind of error that error feedback carries to the next step.

Collectives:
- ``all_reduce``: the payload is a tensor of numbers that can be summed (none, fp16, bf16).
- ``reduce_scatter``: the payload is bit-packed and cannot be summed, so it goes through
  Dryden et al.'s reduce-scatter + all-gather: each rank decompresses and sums the pieces of
  the column range it owns, re-quantizes the sum and all-gathers it (onebit, threshold,
  adaptive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

Collective = Literal["all_reduce", "reduce_scatter"]

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}
_WORD = 2**32
_SIGN = 2**31


@dataclass(frozen=True)
class Layout:
    """The context of a payload: the shape of the (columns, length) matrix it encodes."""

    columns: int
    length: int
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return self.columns * self.length


def as_columns(tensor: torch.Tensor) -> torch.Tensor:
    """The (columns, length) matrix described in the module docstring: the transpose of the
    (shape[0], rest) matrix, so writing into it writes into ``tensor``."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, tensor.numel())
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:])).T


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    """What compressors take: a (columns, length) matrix; a 1-D tensor is one column."""
    if tensor.dim() == 1:
        return tensor.reshape(1, tensor.numel())
    if tensor.dim() != 2:
        raise ValueError(f"compressors take a (columns, length) matrix (see as_columns), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS_CACHE[device]


def to_words(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 words, bit for bit."""
    return torch.where(values >= _SIGN, values - _WORD, values).to(torch.int32)


def from_words(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their unsigned 32-bit values, in int64."""
    return words.to(torch.int64) & (_WORD - 1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans (any shape) -> int32 words, 32 per word: element 8b + j is bit j of byte b,
    and bytes 4w..4w+3 form word w (little-endian, as on x86, ARM and GPUs), so bit k of
    word w is element 32w + k. Built from bytes, which is 8x less memory traffic than
    shifting each element into an int64."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 32
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    packed = (flat.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)
    return packed.view(torch.int32)


def unpack_bits(words: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` booleans packed by ``pack_bits``."""
    packed = words.contiguous().view(torch.uint8)
    bits = (packed.unsqueeze(1) >> _shifts(words.device)) & 1
    return bits.reshape(-1)[:count].bool()


def bf16_as_words(values: torch.Tensor) -> torch.Tensor:
    """Floats -> bf16 (round to nearest even), two per int32 word, bit for bit; an odd count
    is padded with one zero."""
    halves = values.reshape(-1).to(torch.bfloat16)
    if halves.numel() % 2:
        halves = torch.nn.functional.pad(halves, (0, 1))
    return halves.contiguous().view(torch.int32)


def words_as_bf16(words: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` values stored by ``bf16_as_words``, as fp32."""
    return words.contiguous().view(torch.bfloat16)[:count].float()


def _value_pairs_as_words(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two reconstruction values per column, ``c`` of each -> ``c`` words."""
    return bf16_as_words(torch.cat([first, second]))


def _words_as_value_pairs(words: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = words_as_bf16(words, 2 * columns)
    return values[:columns], values[columns:]


class Compressor:
    """Base class, and the uncompressed fp32 scheme. ``compress`` takes a (columns, length)
    matrix (``as_columns(tensor)``, or a slice of its columns) or a 1-D tensor (one column)."""

    name = "none"
    collective: Collective = "all_reduce"
    error_feedback = False

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        columns = _matrix(tensor)
        return tensor, Layout(*columns.shape, tensor.dtype, tensor.device)

    def decompress(self, payload: torch.Tensor, ctx: Layout) -> torch.Tensor:
        return payload.reshape(ctx.columns, ctx.length).to(ctx.dtype)

    def payload_words(self, columns: int, length: int) -> Optional[int]:
        """Payload size in 32-bit words for a (columns, length) matrix; None when it depends
        on the values (threshold)."""
        return columns * length

    def describe(self) -> str:
        return self.name


class HalfPrecision(Compressor):
    """fp16 or bf16 all-reduce: half the bytes, no state. Gradients are divided by the number
    of replicas before the cast (as PyTorch's fp16_compress_hook does), so the sum cannot
    overflow fp16 where the mean would not."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        columns = _matrix(tensor)
        return tensor.to(self.dtype), Layout(*columns.shape, tensor.dtype, tensor.device)

    def payload_words(self, columns: int, length: int) -> Optional[int]:
        return math.ceil(columns * length / 2)


class OneBit(Compressor):
    """Seide et al. (2014): the sign of every entry, 32 per word, and per column the mean of
    its non-negative entries and the mean of its negative entries (bf16, one word per column),
    which reconstruct them. The quantization error, the values' rounding included, is carried
    to the next step (error feedback)."""

    name = "onebit"
    collective: Collective = "reduce_scatter"

    def __init__(self, error_feedback: bool = True):
        self.error_feedback = error_feedback

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        x = _matrix(tensor).float()
        layout = Layout(*x.shape, tensor.dtype, tensor.device)
        positive = x >= 0
        indicator = positive.float()  # float reductions are several times faster than bool
        positives = indicator.sum(dim=1)
        positive_sum = (x * indicator).sum(dim=1)
        negative_sum = x.sum(dim=1) - positive_sum
        mean_positive = positive_sum / positives.clamp(min=1)
        mean_negative = negative_sum / (layout.length - positives).clamp(min=1)
        payload = torch.cat([pack_bits(positive), _value_pairs_as_words(mean_positive, mean_negative)])
        return payload, layout

    def decompress(self, payload: torch.Tensor, ctx: Layout) -> torch.Tensor:
        words = math.ceil(ctx.numel / 32)
        bits = unpack_bits(payload[:words], ctx.numel).view(ctx.columns, ctx.length)
        mean_positive, mean_negative = _words_as_value_pairs(payload[words:], ctx.columns)
        step = (mean_positive - mean_negative).unsqueeze(1)
        return torch.addcmul(mean_negative.unsqueeze(1), bits.float(), step).to(ctx.dtype)

    def payload_words(self, columns: int, length: int) -> Optional[int]:
        return math.ceil(columns * length / 32) + columns


def _index_sign_words(index: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    return to_words(index.to(torch.int64) | (negative.to(torch.int64) << 31))


def _split_index_sign(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = from_words(words)
    return values & (_SIGN - 1), (values >> 31).bool()


class Threshold(Compressor):
    """Strom (2015): entries beyond ±tau are sent as one word each (index in the low 31 bits,
    sign in the top bit) and reconstructed as ±tau; everything else stays in the residual
    (error feedback), to be sent once it has grown past tau. The payload's size depends on the
    values: how many entries crossed tau."""

    name = "threshold"
    collective: Collective = "reduce_scatter"

    def __init__(self, tau: float, error_feedback: bool = True):
        self.tau = float(tau)
        self.error_feedback = error_feedback

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        x = _matrix(tensor).float()
        layout = Layout(*x.shape, tensor.dtype, tensor.device)
        if layout.numel >= _SIGN:
            raise ValueError(f"threshold compression indexes at most 2^31 entries per piece, "
                             f"got {layout.numel}")
        flat = x.reshape(-1)
        index = torch.nonzero(flat.abs() > self.tau).reshape(-1)
        return _index_sign_words(index, flat[index] < 0), layout

    def decompress(self, payload: torch.Tensor, ctx: Layout) -> torch.Tensor:
        index, negative = _split_index_sign(payload)
        out = torch.zeros(ctx.numel, dtype=torch.float32, device=ctx.device)
        out[index] = torch.where(negative, -self.tau, self.tau)
        return out.view(ctx.columns, ctx.length).to(ctx.dtype)

    def payload_words(self, columns: int, length: int) -> Optional[int]:
        return None

    def describe(self) -> str:
        return f"threshold (tau={self.tau:g})"


class Adaptive(Compressor):
    """Dryden et al. (2016): per column, the ``proportion`` of entries of largest magnitude
    are sent as index+sign words; the column's sent positive entries are reconstructed as
    their mean, its sent negative entries likewise. The thresholds adapt to each column and
    step, and the payload has a fixed size: ``k = ceil(proportion * length)`` words plus two
    bf16 reconstruction values (one word) per column."""

    name = "adaptive"
    collective: Collective = "reduce_scatter"

    def __init__(self, proportion: float, error_feedback: bool = True):
        if not 0.0 < proportion <= 1.0:
            raise ValueError(f"proportion must be in (0, 1], got {proportion}")
        self.proportion = float(proportion)
        self.error_feedback = error_feedback

    def sent_per_column(self, length: int) -> int:
        return min(length, max(1, math.ceil(self.proportion * length)))

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        x = _matrix(tensor).float()
        layout = Layout(*x.shape, tensor.dtype, tensor.device)
        if layout.columns == 0:
            return torch.zeros(0, dtype=torch.int32, device=tensor.device), layout
        k = self.sent_per_column(layout.length)
        index = x.abs().topk(k, dim=1, sorted=False).indices
        sent = x.gather(1, index)
        positive = sent > 0
        positives = positive.sum(dim=1)
        positive_sum = torch.where(positive, sent, 0.0).sum(dim=1)
        mean_positive = positive_sum / positives.clamp(min=1)
        mean_negative = (sent.sum(dim=1) - positive_sum) / (k - positives).clamp(min=1)
        payload = torch.cat([
            _index_sign_words(index, ~positive).reshape(-1),
            _value_pairs_as_words(mean_positive, mean_negative),
        ])
        return payload, layout

    def decompress(self, payload: torch.Tensor, ctx: Layout) -> torch.Tensor:
        if ctx.columns == 0:
            return torch.zeros(0, ctx.length, dtype=ctx.dtype, device=ctx.device)
        k = self.sent_per_column(ctx.length)
        sent = ctx.columns * k
        index, negative = _split_index_sign(payload[:sent].view(ctx.columns, k))
        mean_positive, mean_negative = _words_as_value_pairs(payload[sent:], ctx.columns)
        values = torch.where(negative, mean_negative.unsqueeze(1), mean_positive.unsqueeze(1))
        out = torch.zeros(ctx.columns, ctx.length, dtype=torch.float32, device=ctx.device)
        out.scatter_(1, index, values)
        return out.to(ctx.dtype)

    def payload_words(self, columns: int, length: int) -> Optional[int]:
        if columns == 0:
            return 0
        return columns * self.sent_per_column(length) + columns

    def describe(self) -> str:
        return f"adaptive (proportion={self.proportion:g})"


class PackedBfloat16(Compressor):
    """Every entry in bf16, two per int32 word: how the bit-packed exchange sends vectors
    (biases) beside one-bit, threshold or adaptive matrices, with an error-feedback residual
    of their own, so the rounding (relative error at most 2^-8) is carried to the next step
    instead of lost. Quantized like a matrix — one column with two reconstruction values — a
    bias made momentum SGD diverge; this is nearly lossless and costs half of fp32."""

    name = "bf16-packed"
    collective: Collective = "reduce_scatter"

    def __init__(self, error_feedback: bool = True):
        self.error_feedback = error_feedback

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        columns = _matrix(tensor)
        return bf16_as_words(columns), Layout(*columns.shape, tensor.dtype, tensor.device)

    def decompress(self, payload: torch.Tensor, ctx: Layout) -> torch.Tensor:
        return words_as_bf16(payload, ctx.numel).view(ctx.columns, ctx.length).to(ctx.dtype)

    def payload_words(self, columns: int, length: int) -> Optional[int]:
        return math.ceil(columns * length / 2)


SCHEMES = ("none", "fp16", "bf16", "onebit", "threshold", "adaptive")


def build_compressor(
    scheme: str, *, tau: float = 1e-3, proportion: float = 1 / 32, error_feedback: bool = True
) -> Compressor:
    if scheme == "none":
        return Compressor()
    if scheme == "fp16":
        return HalfPrecision(torch.float16)
    if scheme == "bf16":
        return HalfPrecision(torch.bfloat16)
    if scheme == "onebit":
        return OneBit(error_feedback)
    if scheme == "threshold":
        return Threshold(tau, error_feedback)
    if scheme == "adaptive":
        return Adaptive(proportion, error_feedback)
    raise ValueError(f"unknown compression {scheme!r}; allowed: {', '.join(SCHEMES)}")


def threshold_for(tensors: list[torch.Tensor], proportion: float) -> float:
    """A threshold tau that about ``proportion`` of the entries of ``tensors`` exceed: a
    starting point for ``parallel.threshold_tau`` taken from one step's gradients."""
    magnitudes = torch.cat([t.detach().reshape(-1).abs().float() for t in tensors])
    if magnitudes.numel() > 2**24:  # quantile's input limit; a strided sample is plenty
        magnitudes = magnitudes[:: magnitudes.numel() // 2**24 + 1]
    return float(magnitudes.quantile(1.0 - proportion))
