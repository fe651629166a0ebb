"""Averaging gradients across data-parallel replicas through a compressor, with error feedback
and exact accounting of the bytes each rank puts on the wire.

Summable payloads (none, fp16, bf16) go through one all-reduce of one flat buffer. Bit-packed
payloads (onebit, threshold, adaptive) go through Dryden et al.'s two phases, built on
``all_to_all_single`` (gloo, NCCL and MPI all have it). Matrices are quantized by the chosen
scheme; vectors (biases) go through the same two phases in bf16 (``PackedBfloat16``), with
error feedback of their own; the logged values go in one fp32 all-reduce:

1. reduce-scatter: every tensor's columns (``exchange_columns``: ``as_columns`` for a matrix,
   one column per entry for a vector) are split into one range per rank (the same split as
   DTensor's ``Shard(0)`` of the (columns, length) matrix). Each rank compresses its gradient
   plus its residual range by range and sends range ``j`` to rank ``j``, which decompresses
   the pieces from all ranks and sums them.
2. all-gather with re-quantization: each rank compresses the sum of its range (plus a second
   residual of its own: what this re-quantization left out) and sends it to every rank. Every
   rank decompresses every range, including its own from the same payload, so all replicas
   apply bit-identical gradients and stay in step.

Per rank and step this sends ``2 (n-1)/n`` compressed gradients, like a ring all-reduce sends
``2 (n-1)/n`` fp32 gradients, so the saving does not shrink as ranks are added (an all-gather
of whole compressed gradients would send ``n-1``).

Every residual is computed against what the receivers actually decompress (rounded
reconstruction values, bf16 vectors), so nothing that rounding leaves out is lost.

Bytes: for all_to_all_single they are counted exactly (payload words sent to other ranks,
plus the payload sizes of the tensors whose sizes depend on the values). For an all-reduce
they are the bandwidth-optimal ``2 (n-1)/n × buffer bytes`` that ring and
reduce-scatter/all-gather algorithms send per rank (gloo and NCCL use such algorithms for
large buffers).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from terabrain.parallel.compressors import Compressor, Layout, PackedBfloat16, as_columns
from terabrain.parallel.overlap import OverlappedAllReduce


def column_ranges(columns: int, ranks: int) -> list[tuple[int, int]]:
    """Rank ``i``'s columns ``[start, stop)``: DTensor's Shard(0) split (ceil-sized pieces,
    the last ranks possibly empty)."""
    size = math.ceil(columns / ranks) if columns else 0
    return [(min(i * size, columns), min((i + 1) * size, columns)) for i in range(ranks)]


def exchange_columns(tensor: torch.Tensor) -> torch.Tensor:
    """The (columns, length) view a tensor is exchanged as, writing through to ``tensor``: a
    matrix's ``as_columns``; a vector's entries as columns of length 1, so they are split
    over the ranks like a matrix's columns."""
    if tensor.dim() >= 2:
        return as_columns(tensor)
    return tensor.view(-1, 1)


def write_columns(tensor: torch.Tensor, columns: torch.Tensor) -> None:
    """``exchange_columns(tensor).copy_(columns)``, written in ``tensor``'s own layout: a
    contiguous matrix's column view is its transpose, and a copy into a transposed view runs
    through the strided kernel (22 ms for 1,024 x 3,072 floats on one core here) where the
    same values copied from the transposed source into the contiguous tensor use the blocked
    transpose (3.7 ms)."""
    if tensor.dim() >= 2 and tensor.is_contiguous():
        tensor.view(tensor.shape[0], -1).copy_(columns.T)
    else:
        exchange_columns(tensor).copy_(columns)


def exchange_shape(shape: torch.Size) -> tuple[int, int]:
    """(columns, length) of ``exchange_columns`` for a tensor of ``shape``: the shape of its
    residuals."""
    return tuple(exchange_columns(torch.empty(shape, device="meta")).shape)


def all_reduce_bytes(numel: int, itemsize: int, ranks: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal all-reduce of ``numel`` elements."""
    return round(2 * (ranks - 1) * numel * itemsize / ranks) if ranks > 1 else 0


class GradientExchange:
    """Averages a list of gradient tensors across the ranks of ``group`` through
    ``compressor``, in place. Holds the error-feedback residuals, indexed by the tensor's
    position in the list (the trainer passes parameters in model order)."""

    def __init__(self, compressor: Compressor, group: Optional[dist.ProcessGroup], rank: int,
                 size: int, mesh: Optional[DeviceMesh] = None, tag: str = "",
                 overlap_block_bytes: Optional[int] = None):
        """``tag``: prefix of this exchange's checkpoint keys. With model parallelism each
        model rank's data group exchanges its own shards, and saves them under its own keys
        (``model<i>.``), since DCP would merge equal keys from different groups.
        ``overlap_block_bytes``: uncompressed gradients are reduced during the backward pass
        in blocks of about this size (terabrain.parallel.overlap); None: after it, flat."""
        self.tag = tag
        self.compressor = compressor
        self.group = group
        self.rank = rank
        self.size = size
        self.mesh = mesh  # the 1-D data mesh, for checkpointing residuals as DTensors
        # Vectors beside bit-packed matrices: bf16, residuals only if the scheme keeps them.
        self.vectors = PackedBfloat16(compressor.error_feedback)
        self.first: dict[int, torch.Tensor] = {}   # residual of this rank's own gradient
        self.second: dict[int, torch.Tensor] = {}  # residual of the re-quantized range it owns
        self.bytes_sent = 0        # since the last ``take_bytes``
        self.fp32_bytes = 0        # what an fp32 all-reduce of the same tensors would send
        self.overlap: Optional[OverlappedAllReduce] = None
        if overlap_block_bytes is not None and compressor.name == "none":
            self.overlap = OverlappedAllReduce(group, size, overlap_block_bytes,
                                               self._all_reduce_plain, self._count_fp32)

    def _count_fp32(self, elements: int) -> None:
        self.bytes_sent += all_reduce_bytes(elements, 4, self.size)

    def watch(self, model: torch.nn.Module) -> None:
        """Prepare ``model``'s gradients to be reduced while the backward pass runs (with
        overlap; otherwise nothing to do)."""
        if self.overlap is not None:
            self.overlap.watch(model)

    def reset(self) -> None:
        """Forget the residuals: a new training stage has other gradients."""
        self.first.clear()
        self.second.clear()
        self.bytes_sent = self.fp32_bytes = 0
        if self.overlap is not None:
            self.overlap.reset()

    def take_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes an fp32 all-reduce would have sent) since the last call."""
        taken = (self.bytes_sent, self.fp32_bytes)
        self.bytes_sent = self.fp32_bytes = 0
        return taken

    @torch.no_grad()
    def average_(self, gradients: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Replace each gradient and each value by its mean over ranks (values exactly, by
        fp32 all-reduce: they are the logged loss and its parts)."""
        gradient_elements = sum(g.numel() for g in gradients)
        self.fp32_bytes += all_reduce_bytes(gradient_elements + sum(v.numel() for v in values),
                                            4, self.size)
        if self.overlap is not None:
            self.overlap.finish(gradients, values)
            return
        if self.compressor.collective == "all_reduce":
            self._all_reduce(gradients, values)
            return
        # Vectors (biases) in bf16 with their own residuals: quantized as one column with two
        # reconstruction values, a bias diverged under momentum in our tests.
        if values:
            self._all_reduce_plain(values)
        if gradients:
            self._reduce_scatter_all_gather(dict(enumerate(gradients)))

    # --- summable payloads ----------------------------------------------------------------

    def _all_reduce_plain(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, group=self.group)
        self.bytes_sent += all_reduce_bytes(flat.numel(), 4, self.size)
        _scatter_back(flat / self.size, tensors)

    def _all_reduce(self, gradients: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        if self.compressor.name == "none":
            # fp32: values ride along in the same buffer, one collective per step.
            self._all_reduce_plain(gradients + values)
            return
        flat = torch.cat([g.reshape(-1).float() for g in gradients]) / self.size
        payload, _ = self.compressor.compress(flat)
        dist.all_reduce(payload, group=self.group)
        self.bytes_sent += all_reduce_bytes(payload.numel(), payload.element_size(), self.size)
        _scatter_back(payload.float(), gradients)
        if values:
            self._all_reduce_plain(values)

    # --- bit-packed payloads: reduce-scatter + all-gather with re-quantization ----------------

    def _reduce_scatter_all_gather(self, gradients: dict[int, torch.Tensor]) -> None:
        """``gradients``: position in the trainer's list -> gradient (the residuals' key)."""
        n, me = self.size, self.rank
        keys = list(gradients)
        views = [exchange_columns(gradients[key]) for key in keys]
        schemes = [self.compressor if gradients[key].dim() >= 2 else self.vectors for key in keys]
        ranges = [column_ranges(v.shape[0], n) for v in views]

        # Phase 1: compress every range of (gradient + residual); range j goes to rank j.
        outgoing: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for i, (t, view, scheme) in enumerate(zip(keys, views, schemes)):
            corrected = view.float().clone(memory_format=torch.contiguous_format)
            if t in self.first:
                corrected += self.first[t]
            residual = torch.empty_like(corrected) if scheme.error_feedback else None
            for j, (start, stop) in enumerate(ranges[i]):
                payload, ctx = scheme.compress(corrected[start:stop])
                outgoing[j].append(payload)
                if residual is not None:
                    residual[start:stop] = corrected[start:stop] - scheme.decompress(payload, ctx)
            if residual is not None:
                self.first[t] = residual
        words = lambda source: [s.payload_words(r[source][1] - r[source][0], v.shape[1])
                                for s, r, v in zip(schemes, ranges, views)]
        received = self._all_to_all(
            [torch.cat(pieces) if pieces else _words_tensor(0, views) for pieces in outgoing],
            self._exchange_sizes([[p.numel() for p in pieces] for pieces in outgoing],
                                 [words(me)] * n))

        # Sum this rank's range over all ranks, re-quantize it with its own residual.
        mine: list[torch.Tensor] = []
        for i, (t, view, scheme) in enumerate(zip(keys, views, schemes)):
            start, stop = ranges[i][me]
            layout = Layout(stop - start, view.shape[1], torch.float32, view.device)
            total = torch.zeros(layout.columns, layout.length, device=view.device)
            for source in range(n):
                total += scheme.decompress(received[source][i], layout)
            if t in self.second:
                total += self.second[t]
            payload, ctx = scheme.compress(total)
            if scheme.error_feedback:
                self.second[t] = total - scheme.decompress(payload, ctx)
            mine.append(payload)

        # Phase 2: every rank's re-quantized range to every rank.
        buffer = torch.cat(mine) if mine else _words_tensor(0, views)
        gathered = self._all_to_all(
            [buffer] * n, self._exchange_sizes([[p.numel() for p in mine]] * n,
                                               [words(source) for source in range(n)]))
        for i, (t, view, scheme) in enumerate(zip(keys, views, schemes)):
            pieces = []
            for source, (start, stop) in enumerate(ranges[i]):
                layout = Layout(stop - start, view.shape[1], torch.float32, view.device)
                pieces.append(scheme.decompress(gathered[source][i], layout))
            write_columns(gradients[t], torch.cat(pieces).div_(n))

    def _exchange_sizes(self, send_sizes: list[list[int]],
                        known: list[list[Optional[int]]]) -> list[list[int]]:
        """Payload sizes (words per tensor) this rank receives from each rank: ``known[source]``
        holds them where the shapes fix them (None where they depend on the values); only the
        others are exchanged (and counted), one int64 per tensor and peer."""
        unknown = [i for i, size in enumerate(known[0]) if size is None]
        if not unknown:
            return known
        out = torch.tensor([[sizes[i] for i in unknown] for sizes in send_sizes],
                           dtype=torch.int64, device=self._device).reshape(-1)
        into = torch.empty_like(out)
        dist.all_to_all_single(into, out, group=self.group)
        self.bytes_sent += (self.size - 1) * len(unknown) * 8
        exchanged = into.view(self.size, len(unknown)).tolist()
        sizes = [list(row) for row in known]
        for source in range(self.size):
            for position, i in enumerate(unknown):
                sizes[source][i] = exchanged[source][position]
        return sizes

    def _all_to_all(self, outgoing: list[torch.Tensor],
                    receive_sizes: list[list[int]]) -> list[list[torch.Tensor]]:
        """Send ``outgoing[j]`` to rank j; returns, per source rank, its payload split into
        one piece per tensor (``receive_sizes[source]`` words each)."""
        send = torch.cat(outgoing)
        totals = [sum(sizes) for sizes in receive_sizes]
        into = torch.empty(sum(totals), dtype=torch.int32, device=send.device)
        dist.all_to_all_single(into, send, output_split_sizes=totals,
                               input_split_sizes=[p.numel() for p in outgoing], group=self.group)
        self.bytes_sent += 4 * sum(p.numel() for j, p in enumerate(outgoing) if j != self.rank)
        return [list(segment.split(sizes)) for segment, sizes in zip(into.split(totals), receive_sizes)]

    @property
    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- checkpointed state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals as DTensors over the data mesh, so each rank saves its own (plain tensors
        under one key would be saved once, from rank 0): ``first.T`` stacks every rank's
        residual of tensor T (shape ``(ranks, columns, length)``), ``second.T`` is the
        tensor-shaped residual of the re-quantized ranges, one range per rank."""
        if not self.first and not self.second:
            return {}
        state: dict[str, torch.Tensor] = {"ranks": torch.tensor(self.size)}
        for t, residual in self.first.items():
            state[f"{self.tag}first.{t}"] = DTensor.from_local(residual.unsqueeze(0), self.mesh, [Shard(0)],
                                                     run_check=False)
        for t, residual in self.second.items():
            state[f"{self.tag}second.{t}"] = self._second_dtensor(residual, self.first[t].shape
                                                        if t in self.first else None)
        return state

    def _second_dtensor(self, local_range: torch.Tensor, shape: Optional[torch.Size]) -> DTensor:
        columns, length = shape if shape is not None else (local_range.shape[0] * self.size, local_range.shape[1])
        return DTensor.from_local(local_range, self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size((columns, length)), stride=(length, 1))

    def checkpoint_template(self, shapes: list[torch.Size], saved: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """What to load from a checkpoint whose entries are ``saved`` (key -> (shape, dtype)),
        for gradients of ``shapes``. Entries whose shape no longer fits are left out (their
        residual starts at zero). A checkpoint from a different number of ranks is loaded
        whole and redistributed by ``load_state_dict``."""
        if "ranks" not in saved:
            return {}
        template: dict[str, torch.Tensor] = {"ranks": torch.tensor(0)}
        for t, shape in enumerate(shapes):
            columns, length = exchange_shape(shape)
            entry = saved.get(f"{self.tag}first.{t}")
            if entry is not None and tuple(entry[0])[1:] == (columns, length):
                saved_ranks = entry[0][0]
                if saved_ranks == self.size:
                    template[f"{self.tag}first.{t}"] = DTensor.from_local(
                        torch.zeros(1, columns, length, device=self._device), self.mesh,
                        [Shard(0)], run_check=False)
                else:
                    template[f"{self.tag}first.{t}"] = torch.zeros(tuple(entry[0]))
            entry = saved.get(f"{self.tag}second.{t}")
            if entry is not None and tuple(entry[0]) == (columns, length):
                start, stop = column_ranges(columns, self.size)[self.rank]
                template[f"{self.tag}second.{t}"] = DTensor.from_local(
                    torch.zeros(stop - start, length, device=self._device), self.mesh, [Shard(0)],
                    run_check=False,
                    shape=torch.Size((columns, length)), stride=(length, 1))
        return template if len(template) > 1 else {}  # nothing fits: start from zero

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Residuals from a checkpoint; returns notes on what was redistributed.

        Same number of ranks: each rank gets its own residuals back, exactly. ``m`` ranks
        saved, ``n`` now: the update still owed to the model is the mean over ranks of the
        residuals, so each of the ``n`` ranks starts with (sum of the ``m`` saved first-phase
        residuals) / m, and the re-quantization residual is scaled by n / m — the pending
        averaged update is preserved exactly."""
        saved_ranks = int(state.get("ranks", self.size))
        notes = []
        for key, value in state.items():
            if key == "ranks":
                continue
            phase, t = key[len(self.tag):].split(".")
            local = (value.to_local() if isinstance(value, DTensor) else value).to(self._device)
            if phase == "first":
                self.first[int(t)] = local[0].clone() if isinstance(value, DTensor) else local.sum(0) / saved_ranks
            else:
                self.second[int(t)] = local.clone() * (self.size / saved_ranks)
        if saved_ranks != self.size:
            notes.append(f"error-feedback residuals were saved by {saved_ranks} data-parallel "
                         f"ranks and are redistributed over {self.size}: each rank starts from "
                         f"their mean, so the update still owed to the model is preserved")
        return notes


def _words_tensor(count: int, views: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.int32, device=views[0].device)


def _scatter_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view_as(tensor))
        offset += count
