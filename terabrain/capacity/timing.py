"""Seconds per training step of one rank, from a learner's counted work (terabrain.capacity.work)
and a machine profile (terabrain.capacity.profile).

- compute = sum over GEMMs of FLOPs / gemm_rate (locally connected ones at local_efficiency
  of it) + elementwise bytes / elementwise bandwidth + optimizer bytes / optimizer bandwidth
  + a deep network's activation bytes at the activation bandwidth (its losses' and LCN's
  small kernels) + the gradient compressor's passes at its measured rate + the profile's fixed step
  overhead + the dispatch of sharded (DTensor) operations per model-parallel evaluation.
  Where the ranks of a node share one device (CPU nodes), each rank computes at the rates
  ``terabrain calibrate`` measured with that many ranks computing at once
  (``compute.shared``: thin GEMMs do not speed up with threads as square ones do, and two
  hardware threads of one core share its units), or, without such a measurement, at
  1 / (ranks on the node) of the device's rates.
- communication: each collective is alpha x steps(k) + bytes sent / bandwidth over the links
  its group crosses. The mesh is (data, model) row-major, so a model-axis group of m ranks is
  inside a node when m <= ranks per node, and a data-axis group crosses nodes when d x m >
  ranks per node. Across nodes the ranks of a node share its adapters.
- exposed communication: what does not overlap with compute. The model-axis collectives sit
  on the critical path of the forward and backward passes, and so does the data-parallel
  all-reduce without ``parallel.overlap`` (it starts after the whole backward pass).
  Collectives marked ``overlapped`` (the data-parallel gradients with ``parallel.overlap``)
  run while the weight gradients are computed (the ``tn``/``tn+`` products, whose blocks
  they reduce) and are exposed only beyond that time. Where the ranks of a node share its
  CPU, an overlapped collective still costs the cores its ``cpu_fraction`` of the time it
  runs beside them (gloo's socket copies and sums), added to the compute: hidden, not free.
- reading: examples not resident on the device are read by the node (decoded from JPEG or
  pre-decoded pixels); readers overlap with the step unless the profile says they share its
  cores. Every rank of a replica reads that replica's rows, so model parallelism does not
  shrink it: this is what flattens seed 001's strong scaling.
- step = compute + exposed + the part of reading that is not hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from terabrain.capacity.profile import Link, MachineProfile, nearest_measured
from terabrain.capacity.work import StepWork, Transfer

ALGORITHM_STEPS = {
    "all_reduce": lambda k: 2 * (k - 1),
    "all_gather": lambda k: k - 1,
    "reduce_scatter": lambda k: k - 1,
    "point_to_point": lambda k: 1,
}


def roofline(profile: MachineProfile, m: int, n: int, k: int, bf16: bool = False) -> float:
    """FLOP/s bound of one (m x k) @ (k x n) product: min(peak, FLOP per byte x bandwidth),
    each operand and the result moved once."""
    compute = profile.compute
    peak = (compute.peak_flops_bf16 or compute.peak_flops) if bf16 else compute.peak_flops
    item = 2 if bf16 else 4
    intensity = 2.0 * m * n * k / (item * (m * k + k * n + m * n))
    return min(peak, intensity * compute.memory_bandwidth)


def gemm_rate(profile: MachineProfile, m: int, n: int, k: int, bf16: bool = False,
              points: list | None = None, layout: str | None = None) -> float:
    """The roofline corrected by the measured points (the device's, or ``points``: one
    rank's, SharedRates): each point's measured / roofline ratio, weighted by
    1 / (1 + squared distance in log2 shape) so that the nearest shapes decide;
    ``gemm_efficiency`` where no point was measured. With ``layout``, only the points
    measured in that layout count, where there are any."""
    bound = roofline(profile, m, n, k, bf16)
    points = profile.compute.gemm_points if points is None else points
    if layout is not None:
        points = [p for p in points if p.layout == layout] or points
    if not points:
        return bound * profile.compute.gemm_efficiency
    weights, ratios = [], []
    for p in points:
        distance = sum((math.log2(a) - math.log2(b)) ** 2 for a, b in ((m, p.m), (n, p.n), (k, p.k)))
        weight = 1.0 / (1e-3 + distance) ** 2
        weights.append(weight)
        ratios.append(p.flops_per_s / roofline(profile, p.m, p.n, p.k))
    ratio = sum(w * r for w, r in zip(weights, ratios)) / sum(weights)
    return bound * min(ratio, 1.0)


@dataclass
class RankRates:
    """What one rank computes at: the device's rates divided among the ranks of a node, or
    the rates measured with that many ranks computing at once (``slowdown``: how many times
    slower than those, where more ranks run than were measured)."""

    gemm_points: list | None
    local_points: list | None
    gemm_scale: float
    elementwise: float
    optimizer: float
    fresh: float
    compression: dict
    overhead_s: float
    slowdown: float
    layer_overhead_s: float = 0.0
    activation: float = 0.0


def rank_rates(profile: MachineProfile, per_node: int) -> RankRates:
    compute = profile.compute
    fresh = compute.fresh_bandwidth or compute.elementwise_bandwidth
    if not compute.ranks_share_device or not compute.shared:
        share = per_node if compute.ranks_share_device else 1
        return RankRates(None, None, 1 / share, compute.elementwise_bandwidth / share,
                         compute.optimizer_bandwidth / share, fresh / share,
                         {k: v / share for k, v in compute.compression_bandwidth.items()},
                         compute.step_overhead_s, 1.0, compute.deep_layer_overhead_s,
                         (compute.activation_bandwidth or compute.elementwise_bandwidth) / share)
    # The entry measured with as many ranks as run here; else the nearest with more (each
    # rank then gets ranks / per_node more of the node), else the most measured, shared
    # further (time-sharing: per_node / ranks times slower).
    entry = nearest_measured(compute.shared, per_node, lambda e: e.ranks)
    return RankRates(entry.gemm_points, entry.local_points or None, 1.0,
                     entry.elementwise_bandwidth, entry.optimizer_bandwidth,
                     entry.fresh_bandwidth, entry.compression_bandwidth, entry.step_overhead_s,
                     per_node / entry.ranks,
                     entry.deep_layer_overhead_s or compute.deep_layer_overhead_s,
                     entry.activation_bandwidth or entry.elementwise_bandwidth)


@dataclass
class StepTime:
    compute_s: float
    communication_s: float
    exposed_s: float
    read_s: float
    step_s: float
    flops: float

    def images_per_s(self, batch: int) -> float:
        return batch / self.step_s if self.step_s > 0 else math.inf


def ranks_per_node(profile: MachineProfile, devices: int, gpus_per_node: int | None) -> int:
    return max(1, min(devices, gpus_per_node or profile.gpus_per_node))


def crosses_nodes(transfer: Transfer, data: int, model: int, per_node: int) -> bool:
    if transfer.axis == "model":
        return model > per_node
    return data * model > per_node


def group_size(transfer: Transfer, data: int, model: int) -> int:
    return {"model": model, "data": data}.get(transfer.axis, data * model)  # "world": every rank


def transfer_seconds(profile: MachineProfile, transfer: Transfer, data: int, model: int,
                     per_node: int) -> float:
    ranks = group_size(transfer, data, model)
    if ranks <= 1 or transfer.count == 0:
        return 0.0
    inter = crosses_nodes(transfer, data, model, per_node)
    link: Link = profile.link(transfer.collective, inter, per_node)
    bandwidth = link.bandwidth
    if inter:  # the ranks of a node share its adapters
        bandwidth *= min(profile.network.nics_per_node, per_node) / per_node
    steps = ALGORITHM_STEPS[transfer.collective](ranks)
    if transfer.overlapped:
        # Started back to back without waiting (terabrain.parallel.overlap), the calls run in
        # gloo's and NCCL's own threads and streams while compute goes on, so their latencies
        # overlap each other: the chain pays alpha once, then the bytes. Charged call by call,
        # the 6 calls of a 4-rank lbann-ae-small step (3.7 ms of alpha each with 4 ranks on 2
        # cores) gave 1.33 of its measured step, once 1.05 (docs/scaling.md, 2026-12-06).
        # Nor does a chain pay sync_s: it is waited for once, after the backward pass.
        return link.alpha_s * steps + transfer.count * transfer.sent_bytes / bandwidth
    # A call the step waits for also pays what a collective costs between phases of compute
    # (Link.sync_s).
    return transfer.count * (link.alpha_s * steps + transfer.sent_bytes / bandwidth + link.sync_s)


# The products that compute weight gradients (terabrain.learners.hidden_unit_work): an
# overlapped data-parallel exchange reduces their blocks while the next ones are computed.
WEIGHT_GRADIENT_LAYOUTS = ("tn", "tn+")


def sharded_evaluation_seconds(profile: MachineProfile, per_node: int) -> float:
    """A model-parallel evaluation's dispatch with ``per_node`` ranks on the node: as measured
    with that many (network.by_ranks_per_node, the entry the links come from), else the
    profile's one figure."""
    entry = profile.network.measured_with(per_node)
    if entry is not None and entry.sharded_evaluation_s is not None:
        return entry.sharded_evaluation_s
    return profile.compute.sharded_evaluation_s


def compute_seconds(profile: MachineProfile, work: StepWork, per_node: int, bf16: bool,
                    weight_gradients: list | None = None) -> float:
    """Seconds of compute per step; ``weight_gradients``, if given, receives the seconds of
    the weight-gradient products (what an overlapped exchange can hide behind)."""
    compute = profile.compute
    rates = rank_rates(profile, per_node)
    seconds = 0.0
    for gemm in work.gemms:
        local_points = rates.local_points or compute.local_points
        if gemm.local and local_points:  # the layer's measured rate, copies included
            rate = gemm_rate(profile, gemm.m, gemm.n, gemm.k, bf16, local_points, gemm.layout)
            rate *= rates.gemm_scale if rates.local_points is None else 1.0
        else:
            rate = gemm_rate(profile, gemm.m, gemm.n, gemm.k, bf16, rates.gemm_points,
                             gemm.layout)
            rate *= rates.gemm_scale * (compute.local_efficiency if gemm.local else 1.0)
        seconds += gemm.flops / rate
        if weight_gradients is not None and gemm.layout in WEIGHT_GRADIENT_LAYOUTS:
            weight_gradients.append(gemm.flops / rate * rates.slowdown)
    seconds += work.elementwise_bytes / rates.elementwise
    seconds += work.activation_bytes / rates.activation
    seconds += work.fresh_bytes / rates.fresh
    seconds += work.optimizer_bytes / rates.optimizer
    if work.compression is not None:
        scheme, processed = work.compression
        rate = rates.compression.get(scheme, rates.elementwise / 8)
        seconds += processed / rate
    seconds += work.sharded_evaluations * sharded_evaluation_seconds(profile, per_node)
    seconds += work.deep_layers * rates.layer_overhead_s
    return (seconds + rates.overhead_s) * rates.slowdown


def read_seconds(profile: MachineProfile, rows: int, reading: tuple[str, float],
                 per_node: int) -> float:
    """Seconds for one rank to read its ``rows`` examples, each costing ``reading`` (the data
    source's (format, amount), terabrain.data.sources.DataSource.reading): the node's reader
    rate shared by its ranks."""
    read_format, amount = reading
    if read_format == "resident":
        return 0.0
    if read_format == "jpeg":
        return rows * amount / (profile.reader.decode_pixels_per_s / per_node)
    return rows * amount / (profile.reader.pixel_bytes_per_s / per_node)


def predict(profile: MachineProfile, work: StepWork, data: int, model: int, *,
            gpus_per_node: int | None = None,
            reading: tuple[str, float] = ("resident", 0.0), bf16: bool = False) -> StepTime:
    """Seconds per step of the (data x model) split whose rank does ``work``."""
    per_node = ranks_per_node(profile, data * model, gpus_per_node)
    weight_gradients: list[float] = []
    compute = compute_seconds(profile, work, per_node, bf16, weight_gradients)
    communication = exposed = hidden = cpu = 0.0
    for transfer in work.transfers:
        seconds = transfer_seconds(profile, transfer, data, model, per_node)
        communication += seconds
        if not transfer.overlapped:
            exposed += seconds
            continue
        hidden += seconds
        if profile.compute.ranks_share_device:
            link = profile.link(transfer.collective,
                                crosses_nodes(transfer, data, model, per_node), per_node)
            cpu += seconds * (link.cpu_fraction or 0.0)
    behind = min(hidden, sum(weight_gradients))
    exposed += hidden - behind  # longer than what it hides behind
    # Only the part that runs beside the products takes their cores; the rest is the exposed
    # wait itself, when the cores have nothing else to do (counting its CPU time as compute
    # too charged it twice: ae-data-2 predicted at 1.17-1.31 of its step here).
    compute += cpu * (behind / hidden if hidden > 0 else 0.0)
    read = read_seconds(profile, work.rows, reading, per_node)
    busy = compute + exposed
    step = busy + read if not profile.reader.overlaps_compute else max(busy, read)
    return StepTime(compute_s=compute, communication_s=communication, exposed_s=exposed,
                    read_s=read, step_s=step, flops=work.flops)

