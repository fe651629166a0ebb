"""The work of one training step of a deep network (terabrain.learners.deep) on one rank, for
`terabrain plan --profile`. Counted for the pipelined steady state (Ni et al. 2015): every
layer trains on each step, and the frozen forward copies of the layers below the top one
encode the batch once more. A greedy schedule trains one layer at a time, so its steps are
shorter than this figure (each about that layer's share of it).

Per layer, b = batch / data rows, its share of the output rows on the model axis:

- locally connected: at each output location a (b x field) @ (field x maps) product, for
  the encoder and the reconstruction, forward and twice backward (6 per location, at the
  profile's ``local_efficiency``); conv: one (b x locations) x field x maps product, 6 times;
  dense: the five products of a hidden-unit layer (terabrain.learners.hidden_unit_work).
- activations: 18 values moved per input value, 12 per code, 20 per pooled/normalised
  output value (LCN's two windowed passes), at the profile's activation bandwidth (their
  small kernels, measured as such: ``activation_values``); and at the elementwise rate the
  weight passes of a layer (its one gradient buffer and its row normalisation,
  ``WEIGHT_STREAMS``).
- collectives: on the model axis every call of the split network (halo exchanges, the
  dense layer's gathers and reduction, the replicated alphas' gradients, LCN's spreads,
  the losses' sums), each charged its bytes (terabrain.learners.deep_capacity) and what a
  call costs the step (Link.sync_s); then the data axis's gradient exchange.
"""

from __future__ import annotations

import math

from terabrain.capacity.costs import FP32, evaluations_per_step
from terabrain.capacity.work import (
    Gemm,
    StepWork,
    Transfer,
    assemble_step,
)
from terabrain.learners.deep_capacity import _layer_split
from terabrain.learners.hidden_unit_work import VALUES_PER_HIDDEN, VALUES_PER_INPUT

VALUES_PER_OUTPUT = 20


def activation_values(in_values: float, code_values: float, out_values: float) -> float:
    """Values a layer's activation work moves per example (its loss, bias, LCN and pooling:
    small kernels around its maps) for its input, code and output values: what StepWork.
    activation_bytes counts and what terabrain calibrate's activation bandwidth is measured
    in."""
    return VALUES_PER_INPUT * in_values + VALUES_PER_HIDDEN * code_values + VALUES_PER_OUTPUT * out_values

# Passes over a layer's weights beyond its GEMMs (terabrain.nn.shared_weight.
# unit_row_map_pair): its row norms (1); one gradient buffer, the decoder's share written
# (1), the encoder's added (2), the normalisation's added (3); decay (1); renormalising
# the rows after the step (3).
WEIGHT_STREAMS = 1 + 1 + 2 + 3 + 1 + 3
PASSES = 3  # forward, and two products backward


def _layer_gemms(spec, info: dict, model_ranks: int, rows: int, share: float, trains: bool) -> list[Gemm]:
    maps, out_h, out_w = info["codes"]
    encode_macs = info["forward_flops_per_example"] / 4  # enc + reconstruct, 2 FLOP per MAC
    count = 2 * PASSES if trains else 1  # a forward copy only encodes
    if spec.kind == "dense":
        inputs = math.prod(info["input"])
        local_hidden = -(-maps // model_ranks)
        if not trains:
            return [Gemm(rows, local_hidden, inputs, 1, layout="nt")]
        return [Gemm(rows, local_hidden, inputs, 2, layout="nt"),
                Gemm(rows, inputs, local_hidden, 1, layout="nn"),
                Gemm(local_hidden, inputs, rows, 1, layout="tn"),
                Gemm(local_hidden, inputs, rows, 1, layout="tn+")]
    locations = out_h * out_w
    field = max(1, round(encode_macs / (maps * locations)))
    if spec.kind == "local":  # trained: the profile's nn points; a forward copy: its encode ones
        return [Gemm(rows, maps, field, count * math.ceil(locations * share), local=True,
                     layout="nn" if trains else "encode")]
    return [Gemm(rows * locations, maps, field, count)]  # conv: replicated on the model axis


def _split_layer_transfers(spec, sent: float, rows: int, feeds_next: bool) -> list[Transfer]:
    """One layer's collectives per step on the model axis, call by call, as
    terabrain.parallel.spatial_network makes them: each is a point where the ranks wait for
    each other, which costs more than its bytes (Link.sync_s). ``sent``: the layer's bytes
    (terabrain.learners.deep_capacity); ``feeds_next``: its frozen forward copy encodes the
    batch for the layer above (with its pooling and LCN)."""
    if spec.kind == "conv":  # not split on the model axis (the planner refuses the split)
        return []
    alpha = Transfer("all_reduce", "model", FP32, 1)  # the replicated alpha's gradient
    if spec.kind == "dense":
        # All-gather of the input rows (and of the reconstruction's gradient, backward),
        # all-reduce of the partial reconstruction: ``sent`` is half gathers, half reduction.
        gathers = 2 + (1 if feeds_next else 0)
        return [Transfer("all_gather", "model", sent / 2 / 2, gathers),
                Transfer("all_reduce", "model", sent / 2, 1), alpha]
    # Halo messages: the input's gather, the reconstruction's scatter-add and its backward;
    # the frozen copy's gather, its pooling's and LCN's (each a send and a receive per
    # neighbour, posted together).
    halos = 3 + ((1 + (1 if spec.pool else 0) + (1 if spec.lcn else 0)) if feeds_next else 0)
    transfers = [Transfer("point_to_point", "model", sent / halos, halos), alpha]
    if spec.lcn and feeds_next:  # its per-image spread, summed over the rows of every rank
        transfers.append(Transfer("all_reduce", "model", FP32 * rows, 1))
    return transfers


def deep_work(config, table: list[dict]):
    """(data ranks, model ranks, rows per replica) -> StepWork for the layers of ``table``
    (terabrain.learners.deep_capacity.layer_table)."""
    evaluations = evaluations_per_step(config.optimizer)

    def work(data_ranks: int, model_ranks: int, rows: int) -> StepWork:
        gemms, elementwise, activation, transfers, local_total, tensors = [], 0.0, 0.0, [], 0, []
        top = len(table) - 1
        for index, (spec, info) in enumerate(zip(config.model.layers, table)):
            split = _layer_split(spec, info, model_ranks, rows)
            maps, out_h, out_w = info["codes"]
            share = 1.0
            if spec.kind == "local" and model_ranks > 1:
                share = min(1.0, math.ceil(out_h / model_ranks) / out_h)
            gemms += _layer_gemms(spec, info, model_ranks, rows, share, True)
            if index < top:  # the forward copy that feeds the layers above
                gemms += _layer_gemms(spec, info, model_ranks, rows, share, False)
            code_values = maps * out_h * out_w * (share if spec.kind != "dense" else 1 / model_ranks)
            in_values = math.prod(info["input"]) * (share if spec.kind == "local" else 1.0)
            out_values = math.prod(info["output"]) * share
            activation += FP32 * rows * activation_values(in_values, code_values, out_values)
            elementwise += FP32 * WEIGHT_STREAMS * split["local"]
            local_total += split["local"]
            # Each tensor's gradient is reduced whole (none is written in row blocks).
            tensors += [(split["local"] // max(1, info["tensors"]), 0)] * info["tensors"]
            if model_ranks > 1:
                transfers += _split_layer_transfers(spec, split["sent"], rows, index < top)
        if model_ranks > 1:
            # The layer-wise objective sums every rank's losses, the total and the logged
            # parts, in one call.
            transfers.append(Transfer("all_reduce", "model", FP32 * (2 * len(table) + 1), 1))
        step = assemble_step(config, data_ranks, rows, gemms, elementwise, evaluations,
                             local_total, 3 * len(table) + 1, transfers, tensors=tensors)
        step.deep_layers = evaluations * len(table)  # the pipelined steady state: every layer
        step.activation_bytes = evaluations * activation
        return step

    return work
