"""What one training step does on one rank, as the learners count it: the matrix products,
the bytes elementwise kernels and the optimizer stream, and the collectives. The learners
fill it in (``Capacity.work``); terabrain.capacity.timing turns it into seconds with a
machine profile. Counting only: nothing here knows a model kind or a machine.

Counting rules every learner shares are here too: the optimizer's streams per parameter,
and what the data-parallel gradient exchange sends for each ``parallel.compression``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from terabrain.capacity.costs import FP32, fused_update, ring_all_gather, ring_all_reduce
from terabrain.nn.gradient_blocks import block_rows


@dataclass(frozen=True)
class Gemm:
    """``count`` products of (m x k) @ (k x n) per step. ``local``: a locally connected
    layer's per-location product (it runs at the profile's ``local_efficiency``).
    ``layout``: how the operands lie (terabrain.capacity.profile.GemmPoint): nt for x W^T,
    nn for h W, tn for a weight gradient into a new buffer, tn+ for one added into it; for a
    local one, nn for the layer trained and encode for its codes alone (a forward copy)."""

    m: int
    n: int
    k: int
    count: float = 1.0
    local: bool = False
    layout: str = "nn"

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class Transfer:
    """``count`` collectives per step on one mesh axis, each sending ``sent_bytes`` per rank
    (ring factors already applied). ``overlapped``: it runs while compute goes on."""

    collective: str  # all_reduce, all_gather, reduce_scatter, point_to_point
    axis: str  # model, data or world (every rank)
    sent_bytes: float
    count: float = 1.0
    overlapped: bool = False


@dataclass
class StepWork:
    rows: int
    """Examples each rank reads per step (its replica's share of the batch)."""
    gemms: list[Gemm] = field(default_factory=list)
    elementwise_bytes: float = 0.0
    fresh_bytes: float = 0.0
    """Bytes written into newly allocated buffers and read back (their pages fault in)."""
    optimizer_bytes: float = 0.0
    transfers: list[Transfer] = field(default_factory=list)
    compression: tuple[str, float] | None = None
    """(parallel.compression scheme, fp32 gradient bytes its compressor passes over per step)."""
    sharded_evaluations: float = 0.0
    """Closure evaluations per step that run on sharded (DTensor) parameters: each costs the
    profile's ``sharded_evaluation_s`` of dispatch beyond its kernels."""
    deep_layers: float = 0.0
    """Layer steps of a deep network per step (layers x evaluations): each costs the
    profile's ``deep_layer_overhead_s`` beyond its work."""
    activation_bytes: float = 0.0
    """Bytes a deep network's layers move around their maps (the losses, the bias, LCN and
    pooling: many small kernels over activations), at the profile's activation bandwidth."""

    @property
    def flops(self) -> float:
        return sum(g.flops for g in self.gemms)


def optimizer_streams(optimizer, fused: bool = True) -> float:
    """fp32 values the update reads and writes per parameter. Fused: sgd 3 (parameter,
    gradient, parameter), +2 with momentum (its buffer); adam, adamw 7 (+ two moments read
    and written); adagrad 5. torch.optim's loop of separate kernels moves more: sgd with
    momentum 8 (buffer scaled, gradient added, parameter updated: 2 + 3 + 3), adagrad 11
    (the sum, its root into a new buffer, the update), adam 16 (moments, a new denominator,
    the update); rmsprop 5 (+2 with momentum); lbfgs: its two-loop recursion passes over
    2 x history_size flat vectors twice, plus the update and the flat copies (~ 4 h + 10)."""
    name = optimizer.name
    if name == "sgd":
        if optimizer.momentum <= 0:
            return 3
        return 5 if fused else 8
    if name in ("adam", "adamw"):
        return 7 if fused else 16
    if name == "rmsprop":
        return 7 if optimizer.momentum > 0 else 5
    if name == "adagrad":
        return 5 if fused else 11
    return 4 * optimizer.history_size + 10  # lbfgs


# The flat buffer of terabrain.parallel.exchange: cat and divide each write a new buffer
# (2 streams each, into pages that fault in on first touch), the copy back does not.
DATA_PARALLEL_FRESH_STREAMS = 4
DATA_PARALLEL_STREAMS = 2
# parallel.overlap (terabrain.parallel.overlap): each gradient is all-reduced in place and
# divided in place (2 streams), nothing is written into new buffers.
DATA_PARALLEL_OVERLAP_STREAMS = 2
# Compress + decompress passes over the whole gradient per exchange: half precision casts
# once each way; a bit-packed scheme compresses the whole gradient and decompresses it for
# its residual (1), decompresses the n received pieces of its range and the n gathered
# ranges (a decompress of the whole gradient each: about 1 together), and re-quantizes its
# own range with its residual (1/n more: PACKED_RANGE_PASSES).
COMPRESSION_PASSES = {"fp16": 1, "bf16": 1, "onebit": 2, "threshold": 2, "adaptive": 2}
PACKED_RANGE_PASSES = 1
# The bit-packed exchange's own passes around its compressor, in 4-byte streams per gradient
# value (each read and each write one; terabrain.parallel.exchange._reduce_scatter_all_gather).
# Into new buffers, as the flat buffer above: the gradient copied (2), the new residual (3),
# the gathered pieces joined (2): 7. In place: the residual added to the copy (3), the n
# received ranges summed into this rank's range (n additions of 1/n: 3), the joined pieces
# divided by n (2) and copied back into the gradient (2): 10; and per value of this rank's
# own range (1/n of them) its second residual added and the new one made (6). Before these
# were counted the one-bit case was predicted at 0.58 of its measured step (the profiler
# found 44 ms per step in these copies).
PACKED_EXCHANGE_FRESH_STREAMS = 7
PACKED_EXCHANGE_STREAMS = 10
PACKED_EXCHANGE_RANGE_STREAMS = 6


def overlapped_calls(tensors: list[tuple[int, int]], block_bytes: int) -> int:
    """All-reduces the overlapped exchange starts per evaluation (terabrain.parallel.overlap)
    for gradient tensors given as (values, values per row if the tensor's gradient is
    handed out in row blocks (terabrain.nn.gradient_blocks), else 0): one per block of such
    a tensor, one per other tensor."""
    calls = 0
    for values, row_values in tensors:
        if row_values:
            calls += len(block_rows(values // row_values, FP32 * row_values, block_bytes))
        else:
            calls += 1
    return calls


def gradient_exchange(parallel, data_ranks: int, elements: int, scalars: int,
                      evaluations: int = 1, tensors: list[tuple[int, int]] | None = None
                      ) -> tuple[list[Transfer], tuple[float, float], tuple[str, float] | None]:
    """The data axis's collectives per step for ``elements`` local gradient values and the
    ``scalars`` logged with them, the (elementwise, fresh-buffer) bytes around them, and the
    compressor's work (StepWork.compression). Uncompressed sync exchanges with
    ``parallel.overlap`` run during the backward pass (terabrain.parallel.overlap): one
    all-reduce per block or tensor of ``tensors`` (:func:`overlapped_calls`; without them,
    one), and after the pass one the step waits for, of the logged values. The others run
    after the backward pass (terabrain.parallel.exchange)."""
    if data_ranks == 1 or parallel.mode == "hogwild":
        return [], (0.0, 0.0), None
    per_step = evaluations / parallel.average_every if parallel.mode == "localsgd" else evaluations
    compression = parallel.compression if parallel.mode == "sync" else "none"
    copies = (DATA_PARALLEL_STREAMS * FP32 * elements * per_step,
              DATA_PARALLEL_FRESH_STREAMS * FP32 * elements * per_step)
    if compression == "none":
        sent = ring_all_reduce(data_ranks, FP32 * (elements + scalars))
        if parallel.mode == "sync" and parallel.overlap:
            in_place = (DATA_PARALLEL_OVERLAP_STREAMS * FP32 * elements * per_step, 0.0)
            calls = overlapped_calls(tensors, round(parallel.overlap_block_mb * 2**20)) if tensors else 1
            gradients = ring_all_reduce(data_ranks, FP32 * elements)
            return [Transfer("all_reduce", "data", gradients / calls, per_step * calls, overlapped=True),
                    Transfer("all_reduce", "data", ring_all_reduce(data_ranks, FP32 * scalars),
                             per_step)], in_place, None
        return [Transfer("all_reduce", "data", sent, per_step)], copies, None
    if compression in ("fp16", "bf16"):
        work = (compression, COMPRESSION_PASSES[compression] * FP32 * elements * per_step)
        sent = ring_all_reduce(data_ranks, 2 * elements) + ring_all_reduce(data_ranks, FP32 * scalars)
        return [Transfer("all_reduce", "data", sent, per_step)], copies, work
    # onebit (and, as an estimate, threshold and adaptive): one bit per value, reduced by
    # reduce-scatter, re-quantized and all-gathered (terabrain.parallel.exchange).
    passes = COMPRESSION_PASSES[compression] + PACKED_RANGE_PASSES / data_ranks
    work = (compression, passes * FP32 * elements * per_step)
    streams = PACKED_EXCHANGE_STREAMS + PACKED_EXCHANGE_RANGE_STREAMS / data_ranks
    copies = (streams * FP32 * elements * per_step,
              PACKED_EXCHANGE_FRESH_STREAMS * FP32 * elements * per_step)
    payload = elements / 8 + 2 * 2 * (elements ** 0.5)  # signs + bf16 values per column
    transfers = [Transfer("reduce_scatter", "data", ring_all_gather(data_ranks, payload), per_step),
                 Transfer("all_gather", "data", ring_all_gather(data_ranks, payload), per_step),
                 Transfer("all_reduce", "data", ring_all_reduce(data_ranks, FP32 * scalars), per_step)]
    return transfers, copies, work


# After every step the ranks agree whether any of them was told to stop (terabrain.train.
# preemption: one MAX all-reduce of a flag over every rank, read a step later, so no step
# waits for it); free on one rank.
PREEMPTION_CHECK = Transfer("all_reduce", "world", 4, overlapped=True)


def assemble_step(config, data_ranks: int, rows: int, gemms: list[Gemm], elementwise: float,
                  evaluations: int, local_elements: int, scalars: int,
                  transfers: list[Transfer], over_dtensors: bool = False,
                  tensors: list[tuple[int, int]] | None = None) -> StepWork:
    """One step of a learner whose gradient evaluation costs ``gemms``, ``elementwise`` bytes
    and the model axis's ``transfers``, evaluated ``evaluations`` times per step: adds the
    data axis's exchange of its ``local_elements`` gradient values (and ``scalars`` logged
    values) and the optimizer's pass over them (``over_dtensors``: its parameters are
    DTensors, which decides whether the update is fused). ``tensors``: the local gradient
    tensors as :func:`overlapped_calls` takes them."""
    exchange, copies, compression = gradient_exchange(config.parallel, data_ranks, local_elements,
                                                      scalars, evaluations, tensors)
    return StepWork(
        rows=rows, gemms=gemms,
        elementwise_bytes=evaluations * elementwise + copies[0], fresh_bytes=copies[1],
        optimizer_bytes=FP32 * local_elements * optimizer_streams(
            config.optimizer, fused_update(config.optimizer.name, over_dtensors)),
        transfers=transfers + exchange + [PREEMPTION_CHECK], compression=compression,
    )

