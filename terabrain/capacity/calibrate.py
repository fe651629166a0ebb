"""`terabrain calibrate`: measure this machine and write a machine profile
(terabrain.capacity.profile) for `terabrain plan --profile`.

What is measured, on the device given (``--device cpu|cuda``), with this process's threads:

- On CPU the device (the node) is measured with all its cores in one process; then each
  rate is measured again with 2, 4 ... processes computing at once, each with cores / ranks
  threads (``compute.shared``), since that, not a share of the node's rate, is what a rank
  of a multi-rank run gets: thin GEMMs barely speed up with threads, two hardware threads
  share one core, and more ranks than cores time-share.
- GEMM points: ``torch.mm`` at the shapes the learners run (thin batch-40 and batch-256
  products, their weight-gradient transposes, squares); the fastest is the measured peak.
- memory bandwidth: a large copy (read + write).
- the locally connected layer (terabrain.nn.local): its forward + backward rate over the
  GEMM rate of the same per-location shape.
- elementwise bandwidth: an out-of-place ``torch.mul`` of a 1 MB activation from memory.
- fresh-buffer bandwidth: the data-parallel exchange's cat and divide into new buffers.
- optimizer bandwidth: SGD with momentum as training builds it (terabrain.train.optim, fused)
  over a 16 MB parameter (5 streams), its state from memory.
- step overhead: terabrain's trainer stepping a 16 x 16 tied autoencoder (the framework's
  fixed cost per step, logging included).
- gradient compression: compress + decompress of a 1024 x 1024 gradient by each
  ``parallel.compression`` scheme's compressor (terabrain.parallel.compressors).
- reader: JPEG decoding (PIL) of a 300 x 300 image on one core, times the node's cores;
  terabrain's own stream reading fp32 rows of a .npy memory map (workers, queue, collation).
- links, only under a launcher (torchrun, srun, mpirun with N ranks): real all-reduce,
  all-gather, reduce-scatter and send/recv over the world (gloo on CPU, NCCL on CUDA) at
  sizes from 4 kB to 32 MB, fitted to alpha x steps + bytes / bandwidth. When every rank is
  on one node these are the intra-node links and the inter-node ones are copied from them
  (the profile's sources say so); across nodes the world group gives the inter-node links
  and each node's own group the intra-node ones.

Rank 0 writes the profile. Rates are per device: on CPU the device is the node, and
``ranks_share_device`` tells the planner that ranks on a node divide it.
"""

from __future__ import annotations

import io
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from terabrain.capacity.profile import COLLECTIVES, MachineProfile


def _hidden_unit_products(batch: int, hidden: int, inputs: int) -> list[tuple]:
    """The products of a hidden-unit layer's step as the learners run them
    (terabrain.learners.hidden_unit_work): x W^T, h W, h^T g into a new buffer, added."""
    return [(batch, hidden, inputs, "nt"), (batch, inputs, hidden, "nn"),
            (hidden, inputs, batch, "tn"), (hidden, inputs, batch, "tn+")]


# (m, n, k, layout): a 3,072-input layer of 1,024 units at batch 40, the batch split over 2
# and 4 replicas, the units over 2 and 4 model ranks; a 4,096 x 4,096 layer at batch 256
# (bench/scaling.py's), its batch split over 2 replicas (one thread's MKL sgemm runs the
# decoder's h W at batch 128 and below at half its batch-192 rate on the 2-core Xeon, a
# step the 256 points alone do not predict: docs/scaling.md); squares.
GEMM_SHAPES = [
    *(product for family in ((40, 1024, 3072), (20, 1024, 3072), (10, 1024, 3072),
                             (40, 512, 3072), (40, 256, 3072), (256, 4096, 4096),
                             (128, 4096, 4096))
      for product in _hidden_unit_products(*family)),
    (1024, 1024, 1024, "nn"), (2048, 2048, 2048, "nn"), (192, 96, 768, "nn"),
    (192, 64, 1024, "nt"), (64, 1024, 192, "tn"),
]
QUICK_SHAPES = [*_hidden_unit_products(40, 1024, 3072), *_hidden_unit_products(20, 1024, 3072),
                (1024, 1024, 1024, "nn")]
# --quick: each figure from a 0.05 s window (at least 3 calls): a profile in ~15 s on 2
# cores, for tests and a first look; noisier than the default 0.4 s.
QUICK_SECONDS = 0.05
# The smallest message fixes the latency (fit_alpha_beta), the largest the bandwidth.
LINK_SIZES = [64, 4 * 1024, 256 * 1024, 4 * 2**20, 32 * 2**20]
QUICK_LINK_SIZES = [64, 4 * 1024, 1 * 2**20, 8 * 2**20]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Set in the worker processes of measure_shared: there several ranks share the cores, and
# the median call would be one that ran while the others waited for the CPU; the mean over a
# window that every rank spends computing is what each of them gets.
_THROUGHPUT = False


def timed(fn: Callable[[], object], device: torch.device, seconds: float = 0.3,
          at_least: int = 3, between: Callable[[], object] | None = None) -> float:
    """Median seconds of ``fn`` over repeats filling about ``seconds`` (after one warm-up);
    in measure_shared's workers, the mean over the window. ``between`` runs before each
    call, untimed."""
    fn()
    _sync(device)
    times = []
    began = time.perf_counter()
    while len(times) < at_least or time.perf_counter() - began < seconds:
        if between is not None:
            between()
            _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 200 and not _THROUGHPUT:  # the window must stay full when shared
            break
    return statistics.fmean(times) if _THROUGHPUT else statistics.median(times)


FLUSH_BYTES = 64 * 2**20  # more than the last-level cache of most CPUs and GPUs


def measure_gemm(m: int, n: int, k: int, device: torch.device, seconds: float,
                 layout: str = "nn") -> float:
    """FLOP/s of one (m x k) @ (k x n) product in ``layout`` (GemmPoint)."""
    a = torch.randn(k, m, device=device).t() if layout.startswith("tn") else torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device).t() if layout == "nt" else torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    if layout == "tn":  # a new result buffer every call, as a step's first weight gradient
        product = lambda: a @ b
    elif layout == "tn+":
        product = lambda: out.addmm_(a, b)
    else:
        product = lambda: torch.mm(a, b, out=out)
    # A step's products find their operands in memory, not in cache: the other products and
    # the elementwise passes between them move more than the last-level cache holds (here:
    # 12-15 % slower than the same product repeated on warm operands).
    flush = torch.empty(FLUSH_BYTES // 4, device=device)
    return 2.0 * m * n * k / timed(product, device, seconds, between=lambda: flush.add_(1.0))


def measure_copy_bandwidth(device: torch.device, seconds: float) -> float:
    elements = 64 * 2**20 // 4 if device.type == "cpu" else 512 * 2**20 // 4
    a = torch.empty(elements, device=device).fill_(1.0)
    b = torch.empty_like(a)
    return 2.0 * 4 * elements / timed(lambda: b.copy_(a), device, seconds)


def measure_elementwise(device: torch.device, seconds: float) -> float:
    """Bytes/s of an elementwise kernel as a step runs them: out of place (autograd's kernels
    allocate their results), on a 1 MB activation (batch 64 x 4096) that comes from memory
    (a step's products and passes move more than the cache holds). Warm operands in a reused
    buffer ran 4-6x faster here than the step's kernels do."""
    elements = 2**18
    a, b = torch.rand(elements, device=device), torch.rand(elements, device=device)
    flush = torch.empty(FLUSH_BYTES // 4, device=device)
    return 3.0 * 4 * elements / timed(lambda: torch.mul(a, b), device, seconds,
                                      between=lambda: flush.add_(1.0))


# One deep layer's activation work (batch, channels, size, kernel, stride, maps, LCN kernel):
# a locally connected layer's shapes, not those of any built-in experiment.
ACTIVATION_LAYER = (128, 3, 40, 8, 4, 8, 5)


def measure_activation_bandwidth(device: torch.device, seconds: float) -> float:
    """Bytes/s of a deep layer's activation work, in the bytes the planner counts for it
    (terabrain.learners.deep_work.activation_values): the layer-wise objective's RICA loss on
    its codes and its biased reconstruction, forward and backward, and LCN over its codes
    without a graph (what a frozen copy feeds the layer above). Many small kernels,
    reductions and windowed passes: here 9-20 GB/s, against 21-31 for the plain elementwise
    kernel (measure_elementwise), at which the planner left 4-5 ms of a 52-63 ms step of
    bench/plan_accuracy.py's deep network out. Warm operands: a step's loss and LCN read
    what the layer's maps have just written.

    The whole layer's time, its kernels' dispatch included, which the deep layer's fixed
    cost (measure_deep_layer_overhead) also holds: counted twice, a few per cent of it at
    this size. (The marginal rate between two batch sizes avoids that, but as a difference of
    two noisy timings it moved between 13 and 44 GB/s here.) A layer whose activations stay
    in the cache streams faster (8 x 11 x 11 inputs: 40-45 GB/s): the one rate overcharges
    small layers."""
    from terabrain.learners.deep_work import activation_values
    from terabrain.nn.local import output_length
    from terabrain.nn.normalization import LocalContrastNorm
    from terabrain.objectives import rica_loss

    batch, channels, size, kernel, stride, maps, lcn_kernel = ACTIVATION_LAYER
    side = output_length(size, kernel, stride)
    lcn = LocalContrastNorm(lcn_kernel)
    x = torch.rand(batch, channels, size, size, device=device)
    codes = torch.randn(batch, maps, side, side, device=device, requires_grad=True)
    decoded = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    bias = torch.zeros(channels, size, size, device=device, requires_grad=True)

    def layer():
        codes.grad = decoded.grad = bias.grad = None
        loss, _ = rica_loss(codes, decoded + bias, x, 0.1, 1e-2)
        loss.backward()
        with torch.no_grad():
            lcn(codes)

    code_values = maps * side * side
    moved = 4.0 * batch * activation_values(channels * size * size, code_values, code_values)
    return moved / timed(layer, device, seconds)


def measure_optimizer(device: torch.device, seconds: float) -> float:
    from terabrain.config.schema import OptimizerConfig
    from terabrain.train.optim import build_optimizer

    parameter = torch.nn.Parameter(torch.rand(4 * 2**20, device=device))
    parameter.grad = torch.rand_like(parameter)
    # The implementation training uses (terabrain.train.optim: torch.optim's fused kernels).
    optimizer = build_optimizer(OptimizerConfig(name="sgd", lr=1e-6, momentum=0.9), [parameter])
    flush = torch.empty(FLUSH_BYTES // 4, device=device)  # the update finds its state in memory
    return 5.0 * 4 * parameter.numel() / timed(optimizer.step, device, seconds,
                                               between=lambda: flush.add_(1.0))


def measure_fresh(device: torch.device, seconds: float) -> float:
    """Bytes/s of writing into newly allocated buffers and reading them back: what the
    data-parallel exchange's flat buffer costs (terabrain.parallel.exchange: a cat of the
    gradients, then a divide into another new buffer), page faults included."""
    gradients = [torch.rand(1024, 3072, device=device), torch.rand(1024, device=device),
                 torch.rand(3072, device=device)]
    elements = sum(g.numel() for g in gradients)

    def exchange_copies():
        flat = torch.cat([g.reshape(-1) for g in gradients])
        return flat / 2

    return 4.0 * 4 * elements / timed(exchange_copies, device, seconds)


def measure_compression(device: torch.device, seconds: float) -> dict[str, float]:
    """fp32 gradient bytes/s of one compress + decompress of each scheme's compressor
    (terabrain.parallel.compressors) on a 1024 x 1024 gradient."""
    from terabrain.parallel.compressors import SCHEMES, build_compressor

    gradient = torch.randn(1024, 1024, device=device) * 1e-3
    rates = {}
    for scheme in SCHEMES:
        if scheme == "none":
            continue
        compressor = build_compressor(scheme)

        def passes(compressor=compressor):
            payload, layout = compressor.compress(gradient)
            compressor.decompress(payload, layout)

        rates[scheme] = 4.0 * gradient.numel() / timed(passes, device, seconds)
    return rates


TINY_STEPS = 100


def _tiny_trainer(device: torch.device, scratch: Path, parallel=None, hidden: int = 16):
    """terabrain's own trainer on a tied autoencoder of ``hidden`` units over 16 inputs (batch
    8, SGD with momentum, metrics written every 5 steps): everything of a step but its work.
    With ``parallel``, the units split over its model axis (DTensors)."""
    from terabrain.config.schema import OptimizerConfig, TrainConfig
    from terabrain.nn.autoencoder import Autoencoder
    from terabrain.objectives import ReconstructionObjective
    from terabrain.train.callbacks import MetricsLogger
    from terabrain.train.stage import build_trainer

    scratch.mkdir(parents=True, exist_ok=True)
    if parallel is None:
        model = Autoencoder(16, hidden, tied=True, seed=0)
    else:
        with torch.device("meta"):
            unplaced = Autoencoder(16, hidden, tied=True, seed=0)
        model = parallel.parallelize(unplaced, device)
    trainer = build_trainer(
        model, ReconstructionObjective(),
        optimizer=OptimizerConfig(name="sgd", lr=1e-3, momentum=0.9),
        train=TrainConfig(steps=TINY_STEPS, batch_size=8, log_every=5, progress=False), seed=0,
        inputs=torch.rand(64, 16), device=device, parallel=parallel,
        callbacks=[MetricsLogger(scratch / "metrics.jsonl", "calibrate")])

    def run_steps():
        trainer.steps += TINY_STEPS
        trainer.fit()

    return run_steps


def measure_step_overhead(device: torch.device, seconds: float) -> float:
    """The fixed cost of one training step: terabrain's own trainer on a tied autoencoder of
    16 units over 16 inputs, so that everything but the work is there: Python, the dispatch
    of the step's few dozen kernels, autograd, the loop and its logging. (A bare layer's step
    measured a third of it here.)"""
    with tempfile.TemporaryDirectory(prefix="terabrain-calibrate-") as scratch:
        run_steps = _tiny_trainer(device, Path(scratch))
        return timed(run_steps, device, seconds, at_least=3) / TINY_STEPS


# A deep network small enough that its step is all overhead: a local layer with LCN feeding a
# dense layer, on 8 x 8 images at batch 8, pipelined (both train at every step after the
# first, the local layer's frozen copy encoding for the dense one).
TINY_DEEP_LAYERS = [
    {"kind": "local", "maps": 2, "kernel": 4, "stride": 2, "sparsity_weight": 0.1, "lcn": {"kernel": 3}},
    {"kind": "dense", "maps": 4, "sparsity_weight": 0.01},
]
TINY_DEEP_BUILDS = 3


def measure_deep_layer_overhead(device: torch.device, step_overhead_s: float, quick: bool) -> float:
    """What one layer adds to a deep network's step beyond its work: terabrain's trainer on
    TINY_DEEP_LAYERS (the layer-wise objective, LCN, the losses, the schedule's bookkeeping,
    Adam, and the dispatch of their small kernels), less the fixed step overhead, per layer.
    (A 3-layer network of the same kinds measured the same per layer within 15% here.) The
    median over a few fresh trainers of 100 steps, each timed over its whole fit."""
    from terabrain.config.schema import ExperimentConfig
    from terabrain.train.stage import feature_trainer

    config = ExperimentConfig.model_validate({
        "name": "calibrate-deep-overhead", "seed": 0, "device": device.type, "precision": "fp32",
        "data": {"source": "digits"},
        "model": {"kind": "deep", "schedule": "pipelined", "start_after": 1,
                  "layers": TINY_DEEP_LAYERS},
        "objective": {"kind": "rica"}, "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"steps": TINY_STEPS, "batch_size": 8, "log_every": TINY_STEPS, "progress": False},
    })
    generator = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(2 if quick else TINY_DEEP_BUILDS):
        trainer = feature_trainer(config, (8, 8, 1), device=device,
                                  inputs=torch.rand(64, 64, generator=generator).to(device)).trainer
        _sync(device)
        began = time.perf_counter()
        trainer.fit()
        _sync(device)
        per_step.append((time.perf_counter() - began) / max(1, trainer.step))
    return max(0.0, statistics.median(per_step) - step_overhead_s) / len(TINY_DEEP_LAYERS)


def measure_sharded_evaluation(device: torch.device, all_reduce: dict, repeats: int = 5,
                               ranks: int | None = None) -> float:
    """What a closure evaluation of a model-parallel layer costs beyond its work and its
    collectives (every rank of the launcher calls this): the tiny trainer's step with its 16 x
    ranks units split over the first ``ranks`` ranks (all by default; the others wait),
    less the same step on plain tensors run on those ranks at once, less the model's cost of
    the step's all-reduce of the (8 x 16) reconstruction over ``all_reduce`` (the link just
    measured: alpha, bytes and sync_s). 0.0 on ranks outside the group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from terabrain.config.sections import ParallelConfig
    from terabrain.parallel.parallelism import Parallelism

    ranks = ranks or dist.get_world_size()
    # Every rank takes part in creating the mesh's groups; only its members time.
    mesh = DeviceMesh(device.type, torch.arange(ranks).reshape(1, ranks),
                      mesh_dim_names=("data", "model"))
    if dist.get_rank() >= ranks:
        dist.barrier()
        return 0.0
    group = mesh.get_group("model")
    with tempfile.TemporaryDirectory(prefix="terabrain-calibrate-") as scratch:
        sharded = _tiny_trainer(device, Path(scratch) / "sharded",
                                Parallelism(mesh, ParallelConfig(data=1, model=ranks)), 16 * ranks)
        plain = _tiny_trainer(device, Path(scratch) / "plain", hidden=16 * ranks)
        dist.barrier(group=group)
        sharded_s = _max_over_ranks(timed_fixed(sharded, device, repeats) / TINY_STEPS, device,
                                    group)
        dist.barrier(group=group)
        plain_s = _max_over_ranks(timed_fixed(plain, device, repeats) / TINY_STEPS, device, group)
    dist.barrier()
    collective = (all_reduce["alpha_s"] * _steps("all_reduce", ranks)
                  + _ring_sent("all_reduce", ranks, 4 * 8 * 16) / all_reduce["bandwidth"]
                  + all_reduce.get("sync_s", 0.0))
    return max(0.0, sharded_s - plain_s - collective)


# (batch, channels, input side, kernel, stride, maps) of deep networks' locally connected
# layers: yfcc-15b-small's two (bench/plan_accuracy.py's), and bench/local_layer.py's
# seed-000-like layer scaled down.
LOCAL_SHAPES = [(192, 3, 48, 8, 4, 8), (192, 8, 11, 4, 1, 16), (192, 3, 48, 16, 4, 96)]
QUICK_LOCAL_SHAPES = LOCAL_SHAPES[:2]


def measure_local_points(device: torch.device, quick: bool, seconds: float) -> list[dict]:
    """A deep network's locally connected RICA layer trained one step (terabrain.nn.
    shared_weight.unit_row_map_pair through terabrain.nn.filter_maps.LocalMap: the codes,
    the reconstruction and their backward, with the patch copies, the batch-last layout and
    the row normalisation), as a rate of its per-location products: 6 x 2 x batch x field x
    maps FLOP per location (layout nn). Points (m batch, n maps, k field), like GEMM points:
    at small map counts the patch copies, not the products, take most of the time.

    And the same layer's codes alone, as a pipelined network's frozen forward copy encodes
    (unit_row_map_codes without a graph): 2 x batch x field x maps FLOP per location (layout
    encode). Counting it as a sixth of a trained step predicted 3.5 ms for the 8-map layer
    of bench/plan_accuracy.py's deep network, which took 7.0 ms in its steps: its one patch
    copy and the input's batch-last copy are a larger share of one product than of six."""
    from terabrain.nn.filter_maps import LocalMap
    from terabrain.nn.local import output_length
    from terabrain.nn.shared_weight import unit_row_map_codes, unit_row_map_pair

    points = []
    for batch, channels, size, kernel, stride, maps in (QUICK_LOCAL_SHAPES if quick else LOCAL_SHAPES):
        side = output_length(size, kernel, stride)
        field = channels * kernel * kernel
        fmap = LocalMap(kernel, stride, (size, size))
        weight = torch.randn(side * side, maps, field, device=device, requires_grad=True)
        alpha = torch.ones((), device=device, requires_grad=True)
        x = torch.rand(batch, channels, size, size, device=device)
        grad_codes = torch.randn(batch, maps, side, side, device=device)
        grad_input = torch.randn(batch, channels, size, size, device=device)

        def step(fmap=fmap, x=x, weight=weight, alpha=alpha, grads=(grad_codes, grad_input)):
            weight.grad = alpha.grad = None
            codes, decoded = unit_row_map_pair(fmap, x, weight, None, alpha)
            torch.autograd.backward([codes, decoded], list(grads))

        @torch.no_grad()
        def encode(fmap=fmap, x=x, weight=weight, alpha=alpha):
            return unit_row_map_codes(fmap, x, weight, alpha)

        flops = 2.0 * batch * field * maps * side * side
        points.append({"m": batch, "n": maps, "k": field, "layout": "nn",
                       "flops_per_s": 6 * flops / timed(step, device, seconds)})
        points.append({"m": batch, "n": maps, "k": field, "layout": "encode",
                       "flops_per_s": flops / timed(encode, device, seconds)})
    return points


def measure_local_efficiency(device: torch.device, seconds: float) -> float:
    """The locally connected layer's forward + backward FLOP rate over the GEMM rate of its
    per-location shape (bench/local_layer.py's seed-000-like layer, scaled down)."""
    from terabrain.nn.local import LocallyConnected2d

    batch, channels, size, kernel, stride, maps = 192, 3, 48, 16, 4, 96
    layer = LocallyConnected2d(channels, maps, (size, size), kernel, stride, seed=0).to(device)
    x = torch.rand(batch, channels, size, size, device=device, requires_grad=True)
    locations = layer.weight.shape[0]
    field = channels * kernel * kernel

    def step():
        layer.weight.grad = None
        x.grad = None
        layer(x).sum().backward()

    flops = 3 * 2.0 * batch * field * maps * locations
    local_rate = flops / timed(step, device, seconds)
    return min(4.0, local_rate / measure_gemm(batch, maps, field, device, seconds))


def measure_reader(seconds: float) -> tuple[float, float]:
    """(JPEG pixels/s on all of this node's cores, pre-decoded bytes/s through terabrain's
    stream)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 300
    smooth = np.cumsum(rng.normal(size=(side, side)), axis=1)  # photo-like, compressible
    pixels = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()

    def decode():
        Image.open(io.BytesIO(data)).convert("L").load()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    decode_rate = side * side * 3 / timed(decode, torch.device("cpu"), seconds) * (cores or 1)
    return decode_rate, measure_stream(seconds)


def measure_stream(seconds: float, rows: int = 40, values: int = 3072) -> float:
    """Bytes/s of terabrain's own stream (terabrain.data.streamed_source, default workers and
    prefetch) reading fp32 rows of a .npy memory map: what a streamed pre-decoded source
    costs per byte, queue and collation included."""
    import numpy as np

    from terabrain.data.sources import NpyData
    from terabrain.data.streamed_source import StreamSource
    from terabrain.parallel.launch import LaunchEnv

    with tempfile.TemporaryDirectory(prefix="terabrain-calibrate-") as scratch:
        path = Path(scratch) / "rows.npy"
        np.save(path, np.random.default_rng(0).random((50 * rows, values), dtype=np.float32))
        config = NpyData(path=path, stream=True, whitening="none", remove_mean=False)
        source = StreamSource(config, 0, LaunchEnv())
        stream = source.open(rows, None, torch.device("cpu"))
        try:
            steps = iter(range(10**9))
            per_batch = timed(lambda: stream.batch(next(steps)), torch.device("cpu"), seconds,
                              at_least=10)
        finally:
            stream.close()
            source.close()
    return 4.0 * rows * values / per_batch


# --- links ----------------------------------------------------------------------------------


def _ring_sent(collective: str, ranks: int, size: int) -> float:
    if collective == "all_reduce":
        return 2.0 * (ranks - 1) / ranks * size
    if collective in ("all_gather", "reduce_scatter"):
        return (ranks - 1) / ranks * size
    return float(size)


def _steps(collective: str, ranks: int) -> int:
    return {"all_reduce": 2 * (ranks - 1), "all_gather": ranks - 1,
            "reduce_scatter": ranks - 1, "point_to_point": 1}[collective]


def fit_alpha_beta(points: list[tuple[float, float]], steps: int) -> tuple[float, float]:
    """time = a + sent / bandwidth over (sent bytes, seconds) points, fitted in relative
    error (least squares weighted by 1 / time^2); alpha = a / steps (never below 0).

    An unweighted fit is decided by the largest messages, whose milliseconds of noise swamp a
    latency of tens of microseconds: on this loopback it returned alpha = 0 for gloo's
    point-to-point, and the deep network's hundreds of few-kB halo messages cost nothing in
    the model. Weighted by relative error, the smallest message (LINK_SIZES starts at 64
    bytes) fixes the latency and the largest the bandwidth."""
    weights = [1.0 / max(y, 1e-12) ** 2 for _, y in points]
    total = sum(weights)
    mean_x = sum(w * x for w, (x, _) in zip(weights, points)) / total
    mean_y = sum(w * y for w, (_, y) in zip(weights, points)) / total
    slope = (sum(w * (x - mean_x) * (y - mean_y) for w, (x, y) in zip(weights, points))
             / sum(w * (x - mean_x) ** 2 for w, (x, _) in zip(weights, points)))
    slope = max(slope, 1e-15)
    intercept = max(0.0, mean_y - slope * mean_x)
    return intercept / max(1, steps), 1.0 / slope


def timed_fixed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up: collectives need the same number
    of calls on every rank."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_collective(collective: str, group, device: torch.device, sizes: list[int],
                       peer: tuple[int, int] = (0, 1), repeats: int = 7) -> dict[str, float]:
    """alpha and bandwidth of ``collective`` over ``group`` (every rank of it calls this)."""
    import torch.distributed as dist

    ranks = dist.get_world_size(group)
    me = dist.get_rank()
    points = []
    cpu_fraction = None
    for size in sizes:
        elements = size // 4
        if collective == "all_reduce":
            tensor = torch.ones(elements, device=device)
            fn = lambda: dist.all_reduce(tensor, group=group)
        elif collective == "all_gather":
            piece = torch.ones(max(1, elements // ranks), device=device)
            out = torch.empty(piece.numel() * ranks, device=device)
            fn = lambda: dist.all_gather_into_tensor(out, piece, group=group)
        elif collective == "reduce_scatter":
            whole = torch.ones(max(1, elements // ranks) * ranks, device=device)
            out = torch.empty(whole.numel() // ranks, device=device)
            fn = lambda: dist.reduce_scatter_tensor(out, whole, group=group)
        else:
            tensor = torch.ones(elements, device=device)
            sender, receiver = peer

            def fn():
                if me == sender:
                    dist.send(tensor, receiver)
                elif me == receiver:
                    dist.recv(tensor, sender)
        dist.barrier(group=group)
        cpu_began, wall_began = time.process_time(), time.perf_counter()
        seconds = timed_fixed(fn, device, repeats)
        if device.type == "cpu" and size == max(sizes):
            # The process's CPU time (every thread: gloo's included) per second of the
            # collective, at the largest size, where the bytes dominate.
            busy = (time.process_time() - cpu_began) / (time.perf_counter() - wall_began)
            cpu_fraction = _max_over_ranks(busy, device, group)
        points.append((_ring_sent(collective, ranks, size),
                       _max_over_ranks(seconds, device, group)))
    alpha, bandwidth = fit_alpha_beta(points, _steps(collective, ranks))
    link = {"alpha_s": alpha, "bandwidth": bandwidth}
    if cpu_fraction is not None:
        link["cpu_fraction"] = round(cpu_fraction, 3)
    return link


def _max_over_ranks(value: float, device: torch.device, group=None) -> float:
    """The slowest rank decides (every rank calls this)."""
    import torch.distributed as dist

    worst = torch.tensor([value], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst)


# Compute between two blocking collectives when measuring what one costs inside a step: a
# split deep network's step synchronises every few milliseconds (about 20 collectives in
# 80 ms for yfcc-15b-small on 2 ranks).
SYNC_WORK_S = 2e-3
SYNC_ROUNDS = 3
SYNC_MESSAGE_BYTES = 4096


def measure_synchronization(device: torch.device, links: dict, group=None,
                            seconds: float = 0.5) -> dict[str, float]:
    """What a blocking collective costs inside a training step beyond its link's alpha and
    bytes: every rank of ``group`` computes about SYNC_WORK_S between two calls, as a step's
    phases do, and the mean time per call (a step pays every call, the slow ones too) is
    compared with the same compute alone, all ranks computing at once. ``measure_collective``
    times the median of back-to-back calls: the link when it goes well. The tail is the
    machine's: on a 2-core VM with gloo, 16-float all-reduces had a median of 0.66 ms and a
    mean of 2.1 ms (one call in ten waited 4-8 ms, one or two scheduler ticks), and a split
    deep network's step spent a third of its time in its 20 collectives. Returns
    {"all_reduce": s, "point_to_point": s} (point to point as the halo exchange does it: a
    send to and a receive from each neighbour, posted together)."""
    import torch.distributed as dist

    from terabrain.parallel.halo import exchange_messages

    ranks = dist.get_world_size(group)
    if ranks < 2:  # a node of one rank: nothing to wait for inside it
        return {"all_reduce": 0.0, "point_to_point": 0.0}
    me = dist.get_rank(group)
    a = torch.randn(128, 128, device=device)
    product = torch.empty_like(a)

    def one_product():
        torch.mm(a, a, out=product)

    per_product = timed(one_product, device, 0.1)
    count = torch.tensor([max(1, round(SYNC_WORK_S / per_product))], device=device)  # NCCL: on it
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    count = int(count)
    # 4 KB: a step's collectives are rarely single scalars (gloo answered those faster here,
    # 0.3 against 2 ms beyond alpha); zeros, so that repeated sums stay finite.
    message = torch.zeros(SYNC_MESSAGE_BYTES // 4, device=device)
    received = [torch.empty_like(message) for _ in range(2)]
    after, before = (me + 1) % ranks, (me - 1) % ranks

    def work():
        for _ in range(count):
            one_product()

    def all_reduce():
        dist.all_reduce(message, group=group)

    peers = [after] if ranks == 2 else [after, before]
    outgoing, incoming = [(p, message) for p in peers], list(zip(peers, received))
    world = group if group is not None else dist.group.WORLD

    def exchange():
        exchange_messages(outgoing, incoming, world)

    calls = max(20, round(seconds / SYNC_WORK_S))
    means: dict[str, list[float]] = {"alone": [], "all_reduce": [], "point_to_point": []}
    for _ in range(SYNC_ROUNDS):  # interleaved: a slow minute of the machine hits all three
        for name, call in (("alone", None), ("all_reduce", all_reduce), ("point_to_point", exchange)):
            dist.barrier(group=group)
            began = time.perf_counter()
            for _ in range(calls):
                work()
                if call is not None:
                    call()
            _sync(device)
            mean = (time.perf_counter() - began) / calls
            means[name].append(_max_over_ranks(mean, device, group))
    alone = statistics.median(means["alone"])
    costs = {}
    for collective in ("all_reduce", "point_to_point"):
        link = links[collective]
        idle = (link["alpha_s"] * _steps(collective, ranks)
                + _ring_sent(collective, ranks, SYNC_MESSAGE_BYTES) / link["bandwidth"])
        costs[collective] = max(0.0, statistics.median(means[collective]) - alone - idle)
    return costs


def _links_over(group, device: torch.device, sizes: list[int]) -> dict:
    """Every collective's link over ``group`` (every rank of it calls this)."""
    return _with_synchronization(
        {c: measure_collective(c, group, device, sizes) for c in COLLECTIVES}, device, group)


def smaller_group_sizes(world: int, local: int) -> list[int]:
    """2, 4 ... below ``world``, where all the launcher's ranks are on one node (``local``
    per node): the rank counts whose links calibrate also measures."""
    if world // max(1, local) > 1:
        return []
    return [2 ** power for power in range(1, world.bit_length()) if 2 ** power < world]


def measure_smaller_groups(device: torch.device, sizes: list[int],
                           local: int) -> dict[int, dict]:
    """{g: links} for the first g ranks, g in smaller_group_sizes, each measured while the
    node's other ranks wait, as a run with g ranks on this node would have them. On rank 0
    (in every group); {} elsewhere."""
    import torch.distributed as dist

    me = dist.get_rank()
    measured = {}
    for size in smaller_group_sizes(dist.get_world_size(), local):
        group = dist.new_group(list(range(size)))  # every rank takes part in creating it
        if me < size:
            links = _links_over(group, device, sizes)
            if me == 0:
                measured[size] = links
        dist.barrier()  # the others wait here, blocked in gloo's receive, not computing
    return measured


def measure_links(device: torch.device, sizes: list[int],
                  local: int) -> tuple[dict, dict, str, str, dict]:
    """(intra-node links, inter-node links, backend, how, {ranks per node: intra-node links
    of smaller groups}) measured over the launcher's ranks, ``local`` of them per node."""
    import torch.distributed as dist

    world = dist.get_world_size()
    nodes = max(1, world // max(1, local))
    if nodes == 1:
        # A time-shared node's links depend on how many ranks share it: on 2 cores, gloo's
        # all-reduce took 0.26 ms a ring step with 2 ranks and 0.91 ms with 4.
        smaller = measure_smaller_groups(device, sizes, local)
        intra = _links_over(None, device, sizes)
        how = f"{world} ranks on one node: intra-node links measured, inter-node copied from them"
        if smaller:
            how += f"; also with {', '.join(map(str, smaller))} of them (by_ranks_per_node)"
        return intra, dict(intra), dist.get_backend(), how, smaller
    inter = _with_synchronization(
        {c: measure_collective(c, None, device, sizes, peer=(0, local)) for c in COLLECTIVES},
        device, None)
    node_group, _ = dist.new_subgroups(group_size=local)
    intra = _links_over(node_group, device, sizes)
    how = f"{world} ranks on {nodes} nodes: inter-node over the world, intra-node per node"
    return intra, inter, dist.get_backend(), how, {}


def _with_synchronization(links: dict, device: torch.device, group) -> dict:
    """``links`` with each one's ``sync_s`` (measure_synchronization; the gathers and
    reductions take the all-reduce's figure)."""
    costs = measure_synchronization(device, links, group)
    return {c: {**link, "sync_s": costs.get(c, costs["all_reduce"])} for c, link in links.items()}


# --- the profile ----------------------------------------------------------------------------


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The GEMM and local points and the bandwidths are measured in rounds, all of them once per
# round, and each keeps its median round (merge_medians). This machine's speed moves by
# 20-45 % for seconds at a time (other tenants of the VM); one 0.4 s window per point let
# such a dip set a point for good (bench/plan_accuracy.py: a 40 x 1024 x 3072 point at 72
# GFLOP/s in one calibration, 93-97 in the three others, and the one-rank autoencoder
# predicted at 1.19 of its measured step).
POINT_ROUNDS = 3


def measure_rank(device: torch.device, quick: bool, sync: Callable[[], object] = lambda: None) -> dict:
    """What one rank computes at, with this process's threads: GEMM points, elementwise,
    optimizer and fresh-buffer bandwidth, each compressor, the fixed step overhead.
    ``sync`` runs before each measurement (a barrier when several ranks measure at once,
    so that they compete as they do in training)."""
    seconds = QUICK_SECONDS if quick else 0.4
    shapes = QUICK_SHAPES if quick else GEMM_SHAPES
    rounds = 1 if quick else POINT_ROUNDS

    def gemm_round() -> list[dict]:
        points = []
        for m, n, k, layout in shapes:
            sync()
            points.append({"m": m, "n": n, "k": k, "layout": layout,
                           "flops_per_s": measure_gemm(m, n, k, device, seconds / rounds, layout)})
        return points

    def local_round() -> list[dict]:
        sync()
        return measure_local_points(device, quick, seconds / rounds)

    def bandwidth_round() -> dict[str, float]:
        measured = {}
        for name, measure in (("elementwise_bandwidth", measure_elementwise),
                              ("activation_bandwidth", measure_activation_bandwidth),
                              ("optimizer_bandwidth", measure_optimizer),
                              ("fresh_bandwidth", measure_fresh)):
            sync()
            measured[name] = measure(device, seconds / rounds)
        return measured

    rates = {"gemm_points": merge_medians([gemm_round() for _ in range(rounds)]),
             "local_points": merge_medians([local_round() for _ in range(rounds)])}
    # In rounds too, against a moment's dip. (With 4 ranks time-sharing 2 cores the
    # elementwise rate per rank moved here from 2.4 to 16 GB/s between calibrations and
    # between the rounds of one; near 13 it predicted the 4-rank steps at 0.70-0.83 of their
    # measured time, near 3 within 15 %. Rotating the operands instead of flushing the cache
    # between calls gave a steady 17-20 GB/s, which would predict them faster still.)
    rates.update(merge_medians([bandwidth_round() for _ in range(rounds)]))
    for name, measure in (("step_overhead_s", measure_step_overhead),
                          ("compression_bandwidth", measure_compression)):
        sync()
        rates[name] = measure(device, seconds)
    sync()
    rates["deep_layer_overhead_s"] = measure_deep_layer_overhead(device, rates["step_overhead_s"], quick)
    return rates


def _as_training_allocates() -> None:
    """Keep freed buffers for reuse, as ``terabrain train`` does for every model that takes
    under 1/64 of memory (terabrain/train/malloc.py): the figures are then those of a step
    that does not fault its buffers in again."""
    from terabrain.train.malloc import keep_freed_buffers

    keep_freed_buffers()


def _shared_worker(threads: int, quick: bool, barrier, results) -> None:
    global _THROUGHPUT
    _THROUGHPUT = True
    _as_training_allocates()
    torch.set_num_threads(threads)
    results.put(measure_rank(torch.device("cpu"), quick, barrier.wait))


def measure_shared(ranks: int, threads: int, quick: bool) -> dict:
    """Per-rank rates with ``ranks`` processes of ``threads`` threads each measuring at once
    (the slowest rank's figure: it decides a synchronous step)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(ranks), context.Queue()
    workers = [context.Process(target=_shared_worker, args=(threads, quick, barrier, results))
               for _ in range(ranks)]
    for worker in workers:
        worker.start()
    measured = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    points = {kind: [{**point, "flops_per_s": min(m[kind][i]["flops_per_s"] for m in measured)}
                     for i, point in enumerate(measured[0][kind])]
              for kind in ("gemm_points", "local_points")}
    slowest = {key: min(m[key] for m in measured)
               for key in ("elementwise_bandwidth", "activation_bandwidth", "optimizer_bandwidth",
                           "fresh_bandwidth")}
    compression = {scheme: min(m["compression_bandwidth"][scheme] for m in measured)
                   for scheme in measured[0]["compression_bandwidth"]}
    return {"ranks": ranks, "threads": threads, **points, **slowest,
            "compression_bandwidth": compression,
            "step_overhead_s": max(m["step_overhead_s"] for m in measured),
            "deep_layer_overhead_s": max(m["deep_layer_overhead_s"] for m in measured)}


def shared_rank_counts(cores: int) -> list[int]:
    """1, 2, 4 ... ranks up to the cores, and twice the cores on small nodes (more ranks
    than cores: they time-share)."""
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    if cores <= 8:
        counts.append(2 * cores)
    return sorted(set(counts))


def measure_device(device: torch.device, quick: bool, log: Callable[[str], None]) -> dict:
    """Every compute and reader figure of the profile, measured on ``device`` with this
    process's threads (all the node's cores on CPU)."""
    seconds = QUICK_SECONDS if quick else 0.4
    rates = measure_rank(device, quick)
    for point in rates["gemm_points"]:
        log(f"  gemm {point['m']} x {point['n']} x {point['k']} {point['layout']}: "
            f"{point['flops_per_s'] / 1e9:.1f} GFLOP/s")
    for point in rates["local_points"]:
        what = "trained" if point["layout"] == "nn" else "codes alone"
        log(f"  local layer {what}, batch {point['m']}, {point['n']} maps, field {point['k']}: "
            f"{point['flops_per_s'] / 1e9:.1f} GFLOP/s")
    rates["memory"] = measure_copy_bandwidth(device, seconds)
    rates["local"] = measure_local_efficiency(device, seconds)
    rates["decode"], rates["pixel_bytes"] = measure_reader(seconds)
    log(f"  memory {rates['memory'] / 1e9:.1f} GB/s, elementwise "
        f"{rates['elementwise_bandwidth'] / 1e9:.1f} GB/s (a deep layer's activations "
        f"{rates['activation_bandwidth'] / 1e9:.1f}), optimizer "
        f"{rates['optimizer_bandwidth'] / 1e9:.1f} GB/s, fresh buffers "
        f"{rates['fresh_bandwidth'] / 1e9:.1f} GB/s, step overhead "
        f"{rates['step_overhead_s'] * 1e3:.2f} ms (a deep layer "
        f"{rates['deep_layer_overhead_s'] * 1e3:.2f} ms more), local layer {rates['local']:.0%} of GEMM, "
        f"JPEG {rates['decode'] / 1e6:.0f} Mpixel/s, pixels {rates['pixel_bytes'] / 1e9:.1f} GB/s")
    log("  compression (compress + decompress): " + ", ".join(
        f"{scheme} {rate / 1e9:.2f} GB/s" for scheme, rate in rates["compression_bandwidth"].items()))
    return rates


def measure_node(device: torch.device, quick: bool, log: Callable[[str], None]) -> dict:
    """Every compute and reader figure of the node: the device with all its cores, and on
    CPU what each rank gets with 2, 4 ... ranks computing at once (``compute.shared``):
    multiplying one core's rate by the cores predicted half the measured step times on a
    quiet 2-core machine (thin batch-40 GEMMs do not speed up with a second thread, and two
    hardware threads share one core)."""
    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        torch.set_num_threads(cores)
    try:
        rates = measure_device(device, quick, log)
    finally:
        torch.set_num_threads(threads)
    rates["shared"] = []
    if device.type == "cpu":
        rates["shared"].append({
            "ranks": 1, "threads": cores,
            **{key: rates[key] for key in ("gemm_points", "local_points", "elementwise_bandwidth",
                                           "activation_bandwidth", "optimizer_bandwidth",
                                           "fresh_bandwidth",
                                           "compression_bandwidth", "step_overhead_s",
                                           "deep_layer_overhead_s")}})
        # --quick keeps only the 1-rank entry (more ranks then time-share it): the
        # several-rank measurements start real processes and take most of the time.
        for ranks in ([] if quick else shared_rank_counts(cores)[1:]):
            entry = measure_shared(ranks, max(1, cores // ranks), quick)
            rates["shared"].append(entry)
            thin = entry["gemm_points"][0]
            log(f"  {ranks} ranks at once, {entry['threads']} thread(s) each: gemm "
                f"{thin['m']} x {thin['n']} x {thin['k']} {thin['layout']} "
                f"{thin['flops_per_s'] / 1e9:.1f} GFLOP/s per rank, "
                f"elementwise {entry['elementwise_bandwidth'] / 1e9:.1f} GB/s, "
                f"fresh {entry['fresh_bandwidth'] / 1e9:.1f} GB/s")
    return rates


def merge_medians(measured: list):
    """Figure by figure, the median of several measurements of the same structure (dicts,
    lists of points, numbers); what is not a number (names, None) from the first."""
    first = measured[0]
    if isinstance(first, dict):
        return {key: merge_medians([m[key] for m in measured]) for key in first}
    if isinstance(first, list):
        return [merge_medians([m[i] for m in measured]) for i in range(len(first))]
    if isinstance(first, bool) or not isinstance(first, (int, float)) or all(m == first for m in measured):
        return first
    return statistics.median(measured)


def calibrate(device: torch.device, *, quick: bool = False, name: str | None = None,
              local_ranks: int = 1, log: Callable[[str], None] = print,
              repeats: int = 1) -> MachineProfile | None:
    """Measure this machine (and, inside an initialised process group, the links); None on
    ranks other than 0. ``repeats``: every measurement that many times, one after the other,
    each figure the median (a shared VM's speed moves for minutes at a time: on the 2-core
    machine of docs/scaling.md, one calibration's 2-rank elementwise rate was 20.7 GB/s
    against 11.5-15.8 in eight others, and it predicted the 2-rank steps at 0.79-0.84)."""
    if repeats < 1:
        raise ValueError(f"repeats {repeats}; allowed: 1 or more")
    import torch.distributed as dist

    _as_training_allocates()

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    # Under a launcher rank 0 measures the node (measure_node) while the other ranks wait,
    # then all of them the links; round by round, so that no rank waits for more than one.
    sizes = QUICK_LINK_SIZES if quick else LINK_SIZES
    node_rounds, link_rounds = [], []
    for index in range(repeats):
        if repeats > 1:
            log(f"  round {index + 1} of {repeats}")
        if not distributed or dist.get_rank() == 0:
            node_rounds.append(measure_node(device, quick, log))
        if distributed:
            dist.barrier()
            link_rounds.append(measure_links(device, sizes, local_ranks))
    rates = merge_medians(node_rounds) if node_rounds else {}
    if distributed:
        intra, inter, smaller = (merge_medians([links[i] for links in link_rounds])
                                 for i in (0, 1, 4))
        backend, how = link_rounds[0][2:4]
        world = dist.get_world_size()
        evaluations = {}
        for ranks in [*smaller_group_sizes(world, local_ranks), world]:
            # Rank 0 holds the measured links (the others' results are not written).
            all_reduce = smaller.get(ranks, intra)["all_reduce"]
            evaluations[ranks] = statistics.median(
                measure_sharded_evaluation(device, all_reduce, ranks=ranks)
                for _ in range(repeats))
        sharded_evaluation = evaluations[world]
        links_by_ranks = {**smaller, world: intra}
        by_ranks = ({ranks: {"links": links, "sharded_evaluation_s": evaluations[ranks]}
                     for ranks, links in links_by_ranks.items()} if smaller else {})
        for ranks, links in links_by_ranks.items():
            for collective in COLLECTIVES:
                link = links[collective]
                cpu_share = link.get("cpu_fraction")
                log(f"  {collective}, {ranks} ranks: intra {link['alpha_s'] * 1e6:.0f} us/step, "
                    f"{link['bandwidth'] / 1e9:.2f} GB/s, "
                    f"{link['sync_s'] * 1e6:.0f} us more per call inside a step"
                    + (f", {cpu_share:.2f} CPU s per s" if cpu_share is not None else ""))
            log(f"  a model-parallel evaluation's dispatch (DTensor), {ranks} ranks: "
                f"{evaluations[ranks] * 1e3:.2f} ms beyond its kernels and collectives")
    else:
        sharded_evaluation = 0.0  # not measured: no ranks to split a layer over
        fallback = {"alpha_s": 5e-5, "bandwidth": 1e9}
        intra = inter = {c: dict(fallback) for c in COLLECTIVES}
        by_ranks = {}
        backend = "gloo" if device.type == "cpu" else "nccl"
        how = "not measured (one process): run `terabrain calibrate` under a launcher with N ranks"
    if distributed and dist.get_rank() != 0:
        return None  # rank 0 writes the profile
    cpu = device.type == "cpu"
    threads = os.cpu_count() if cpu else torch.get_num_threads()
    device_name = (f"{platform.processor() or platform.machine()}, {threads} threads"
                   if cpu else torch.cuda.get_device_name(device))
    measured = "terabrain calibrate: measured on this machine" + (
        f", each figure the median of {repeats} rounds" if repeats > 1 else "")
    profile = MachineProfile(
        name=name or f"{socket.gethostname()}-{device.type}",
        description=f"measured by terabrain calibrate on {socket.gethostname()} ({device_name})",
        gpus_per_node=max(local_ranks, os.cpu_count() or 1) if cpu else max(local_ranks, torch.cuda.device_count()),
        device_memory=device_memory(device),
        compute={
            # From the merged points: the median of each round's fastest point is not the
            # fastest of the points the profile keeps.
            "device": device_name,
            "peak_flops": max(p["flops_per_s"] for p in rates["gemm_points"]),
            "memory_bandwidth": rates["memory"], "gemm_efficiency": 1.0,
            "gemm_points": rates["gemm_points"], "local_efficiency": rates["local"],
            "local_points": rates["local_points"],
            "elementwise_bandwidth": rates["elementwise_bandwidth"],
            "activation_bandwidth": rates["activation_bandwidth"],
            "optimizer_bandwidth": rates["optimizer_bandwidth"],
            "fresh_bandwidth": rates["fresh_bandwidth"],
            "step_overhead_s": rates["step_overhead_s"],
            "deep_layer_overhead_s": rates["deep_layer_overhead_s"],
            "sharded_evaluation_s": sharded_evaluation,
            "compression_bandwidth": rates["compression_bandwidth"],
            "ranks_share_device": cpu, "shared": rates["shared"],
        },
        network={"backend": backend, "intra_node": intra, "inter_node": inter, "nics_per_node": 1,
                 "by_ranks_per_node": [{"ranks_per_node": ranks, **entry}
                                       for ranks, entry in sorted(by_ranks.items())]},
        reader={"decode_pixels_per_s": rates["decode"], "pixel_bytes_per_s": rates["pixel_bytes"],
                "overlaps_compute": not cpu},
        sources={
            "gpus_per_node": "the cores of this node (CPU: ranks share them) or its GPUs; "
                             "override with plan --gpus-per-node",
            "device_memory": "this machine's memory",
            "compute.peak_flops": "the fastest measured GEMM point",
            "compute": measured + (" with all the node's cores; compute.shared: with 1, 2, 4 "
                                   "... ranks measuring at once" if cpu else ""),
            "network": how,
            "network.nics_per_node": "not measured: 1",
            "reader": measured + " (JPEG: one core x the node's cores)",
        },
        measured={
            "host": socket.gethostname(), "device": device_name, "torch": torch.__version__,
            "threads": str(threads), "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "links": how,
        },
    )
    return profile


def calibrate_command(args) -> int:
    from terabrain.errors import ConfigError
    from terabrain.parallel.launch import detect_launch_env, init_distributed

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; allowed: cpu")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: allowed: 1 or more")
    env = detect_launch_env()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if env.world_size > 1:
        init_distributed(env, backend="nccl" if args.device == "cuda" else "gloo")
    rank0 = env.rank == 0
    try:
        if rank0:
            print(f"terabrain calibrate: {args.device}, {env.world_size} rank(s)", flush=True)
        profile = calibrate(device, quick=args.quick, name=args.name, repeats=args.repeats,
                            local_ranks=env.local_world_size, log=print if rank0 else (lambda _: None))
        if rank0:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(profile.to_yaml())
            print(f"wrote {out}")
    finally:
        if env.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0

