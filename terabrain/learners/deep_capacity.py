"""Capacity of a deep network (terabrain.learners.deep) for `terabrain plan`: per-layer
parameters and work, and for every (data x model) mesh the memory per rank and the bytes
each rank sends per step.

The network is built on the meta device, so counts are those of the modules that train.
On the model axis (terabrain.parallel.spatial_network, what training does) a locally
connected layer is split by output rows: each rank holds its rows' filters and exchanges
halo rows with its neighbours (``local_layer_blocks``); a dense top layer is split by
hidden unit (its input all-gathered, its reconstruction all-reduced); conv layers are not
split (training refuses them on a model axis; counted here as replicated). Per rank, with
b = batch / data:

- which layers train at once: layer-wise training (terabrain.learners.layerwise) trains
  only its active layers; ``active_layer_sets`` replays the schedule (greedy: one layer;
  pipelined: layer L+1 starts after layer L's ``start_after`` steps, or when it finishes).
  Gradients, optimizer state and activations are those of the largest such set.
- weights: every layer's parameters (fp32, or bf16 with precision bf16-weights), plus the
  forward copies a pipelined schedule keeps of the layers below the top one (Ni et al.
  2015's second instance of each layer; ``model.forward_copies`` fp32 or bf16). Greedy
  training keeps none: a layer below the one training has finished and no longer changes.
- gradients: one buffer per parameter of the active layers (the tied W's encoder,
  decoder and row normalisation contributions are added into one buffer by
  terabrain.nn.shared_weight.unit_row_map_pair, so are an untied layer's two matrices:
  1x each), in the weights' dtype.
- optimizer state: as terabrain.capacity.costs (adam 2x, sgd with momentum 1x, ...) of the
  active layers, fp32; a layer's state is dropped when it finishes. Plus the step's
  transient (costs.optimizer_transient) of the largest active tensor.
- activations: of the active layers, 4 B x b x (3 x input + 3 x codes + post-processed
  output) of the rank's rows.
- sent:model per step: forward and backward of the encoder and of the reconstruction each
  move the halo once (4 halos per local layer); dense layers all-gather their input,
  all-reduce their reconstruction and all-gather its gradient; pooling (kernel - stride
  rows) and LCN (2 (kernel // 2) rows each side) move their halos once (forward copies run
  without gradient).
- sent:data: one ring all-reduce of the local gradients.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from terabrain.capacity.costs import (
    FP32, optimizer_state, optimizer_transient, ring_all_reduce, weight_bytes,
)
from terabrain.capacity.planner import Capacity, RankFigures
from terabrain.units import format_count
from terabrain.errors import ConfigError
from terabrain.nn.deep import DeepNetwork, input_shape_from
from terabrain.parallel.spatial import split_evenly
from terabrain.parallel.spatial_network import local_layer_blocks

if TYPE_CHECKING:
    from terabrain.config.schema import ExperimentConfig


def input_shape_of(config: "ExperimentConfig",
                   example_shape: Optional[tuple[int, ...]] = None) -> tuple[int, int, int]:
    """(channels, height, width): model.input_shape, else the data source's example shape."""
    if config.model.input_shape is not None:
        return tuple(config.model.input_shape)
    if example_shape is None:
        from terabrain.data.sources import source_of

        example_shape = source_of(config.data).example_shape(config.data)
    try:
        return input_shape_from(example_shape)
    except ValueError:
        raise ConfigError(
            "model.input_shape: set (channels, height, width) to plan a deep network on "
            f"data.source {config.data.source}, whose examples are not images") from None


def layer_table(config: "ExperimentConfig", example_shape: Optional[tuple[int, ...]] = None) -> list[dict]:
    """Per layer: kind, shapes, parameters, forward multiply-adds per example."""
    from terabrain.nn.deep import FilterBank

    shape = input_shape_of(config, example_shape)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            network = DeepNetwork(config.model.layers, shape, seed=0)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    table = []
    for index, (layer, spec) in enumerate(zip(network.layers, config.model.layers)):
        encoder: FilterBank = layer.encoder
        in_shape, out_shape = layer.in_shape, layer.out_shape
        rows = math.prod(out_shape[1:]) if spec.kind == "conv" else 1
        encoder_macs = encoder.weight.numel() * rows  # every weight used once per location
        table.append({
            "layer": index + 1,
            "kind": spec.kind,
            "input": list(in_shape),
            "codes": list(out_shape),
            "output": list(network.shapes[index + 1]),
            "parameters": sum(p.numel() for p in layer.parameters()),
            "tensors": sum(1 for p in layer.parameters() if p.requires_grad),
            "filter_parameters": sum(bank.weight.numel() for bank in layer.banks()),
            "banks": len(layer.banks()),
            # encode + reconstruct, forward; training is about 3x (forward + backward).
            "forward_flops_per_example": 2 * 2 * encoder_macs,
        })
    return table


def _layer_split(spec, info: dict, model_ranks: int, rows_b: int) -> dict:
    """One layer on ``model_ranks`` ranks: local parameter elements, activation values and
    bytes sent per step, and why it cannot be split that way (empty when it can)."""
    channels, height, width = info["input"]
    maps, out_h, out_w = info["codes"]
    parameters = info["parameters"]
    bank = info["filter_parameters"] // info["banks"]  # one filter bank: the largest tensor
    result = {"local": parameters, "largest": bank, "sent": 0.0, "reason": ""}
    share = 1.0
    if model_ranks > 1 and spec.kind == "local":
        padding = spec.padding_sides
        added = sum(padding)
        if out_h < model_ranks:
            result["reason"] = f"layer {info['layer']}: {out_h} rows < {model_ranks} ranks"
            share = 1.0 / out_h
        else:
            blocks = local_layer_blocks(split_evenly(height, model_ranks), height, padding,
                                        spec.kernel, spec.stride)
            share = max(b.output_rows[1] - b.output_rows[0] for b in blocks) / out_h
            halo = max(b.halo_rows for b in blocks)
            result["sent"] += 4 * halo * FP32 * rows_b * channels * (width + added)
        # Pooling and LCN run on the frozen forward copies: forward only. LCN's two nested
        # windows reach 2 (kernel // 2) rows on each side.
        window_rows = (spec.pool.kernel - (spec.pool.stride or spec.pool.kernel) if spec.pool else 0) + (
            4 * (spec.lcn.kernel // 2) if spec.lcn else 0
        )
        result["sent"] += window_rows * FP32 * rows_b * maps * out_w
        result["local"] = math.ceil(parameters * share)
        result["largest"] = math.ceil(bank * share)
    elif model_ranks > 1 and spec.kind == "dense":
        if maps % model_ranks:
            result["reason"] = f"layer {info['layer']}: {maps} units not divisible by {model_ranks}"
        share = 1.0 / model_ranks
        filters = info["filter_parameters"]
        result["local"] = math.ceil(filters / model_ranks) + parameters - filters
        result["largest"] = math.ceil(bank / model_ranks)
        ring = 2.0 * (model_ranks - 1) / model_ranks
        # All-gather of the input (half a ring all-reduce), all-reduce of the partial
        # reconstruction, all-gather of its rows' gradient (backward).
        result["sent"] += 2.0 * ring * FP32 * rows_b * channels * height * width
    in_values = channels * height * width * (share if spec.kind == "local" else 1.0)
    code_values = maps * out_h * out_w * share
    out_values = math.prod(info["output"]) * share
    result["activation_values"] = rows_b * (3 * in_values + 3 * code_values + out_values)
    return result


def active_layer_sets(config: ExperimentConfig) -> list[list[int]]:
    """The sets of layers that train at the same time over a run, replaying the layer-wise
    schedule (terabrain.learners.layerwise.LayerSchedule) with every layer spending its
    budget. Greedy: one layer at a time. Pipelined: layer L+1 starts once layer L has
    trained ``model.start_after`` steps or has finished; with early stopping a layer may
    finish sooner and the next start sooner, so every layer is counted as active at once."""
    model, train = config.model, config.train
    count = len(model.layers)
    if model.schedule == "greedy":
        return [[k] for k in range(count)]
    if train.early_stopping.patience > 0:
        return [list(range(count))]
    budgets = [layer.steps or train.steps for layer in model.layers]
    starts = [0]
    for k in range(1, count):
        starts.append(starts[-1] + min(model.start_after, budgets[k - 1]))
    return [[k for k in range(count) if starts[k] <= t < starts[k] + budgets[k]] for t in starts]


def deep_capacity(config: "ExperimentConfig", example_shape: tuple[int, ...]) -> Capacity:
    from terabrain.learners.deep_work import deep_work  # it reads _layer_split from here

    table = layer_table(config, example_shape)
    total = sum(row["parameters"] for row in table)
    sets = active_layer_sets(config)
    pipelined = config.model.schedule == "pipelined"
    weight_size = weight_bytes(config.precision)
    copy_size = 2 if config.model.forward_copies == "bf16" else FP32

    def per_rank(data_ranks: int, model_ranks: int, rows_b: int) -> RankFigures:
        layers = [_layer_split(spec, info, model_ranks, rows_b)
                  for spec, info in zip(config.model.layers, table)]
        local = sum(layer["local"] for layer in layers)
        copied = sum(layer["local"] for layer in layers[:-1]) if pipelined else 0

        def largest(key, combine=sum):
            return max(combine(layers[k][key] for k in active) for active in sets)

        trained = largest("local")
        return RankFigures(
            reasons=[layer["reason"] for layer in layers if layer["reason"]],
            local_parameters=local,
            weights=weight_size * local + copy_size * copied,
            # Updated inside the backward pass: one tensor's gradient at a time.
            gradients=weight_size * (largest("largest", max) if config.train.optimizer_in_backward
                                     else trained),
            optimizer=FP32 * (optimizer_state(config.optimizer, trained, total)
                              + optimizer_transient(config.optimizer, largest("largest", max),
                                                    config.precision)),
            activations=FP32 * round(largest("activation_values")),
            model_axis_sent=round(sum(layer["sent"] for layer in layers)),
            data_axis_sent=round(ring_all_reduce(data_ranks, weight_size * trained + FP32 * (3 * len(table) + 1))),
        )

    description = "deep " + " -> ".join(
        ["x".join(map(str, table[0]["input"]))]
        + [f"{row['kind']} {'x'.join(map(str, row['output']))}" for row in table]
    )
    concurrent = max(sets, key=lambda active: sum(table[k]["parameters"] for k in active))
    return Capacity(
        description=description, parameters=total, hidden=table[-1]["codes"][0],
        per_rank=per_rank, layers=table, work=deep_work(config, table),
        notes=[
            "layers: " + "; ".join(
                f"{row['layer']} {row['kind']} {format_count(row['parameters'])} parameters, "
                f"{row['forward_flops_per_example'] / 1e9:.2f} GFLOP per example forward"
                for row in table),
            ("model axis: local layers split by output rows with halo exchange, dense layers by "
             "hidden unit, conv layers replicated"),
            (f"schedule {config.model.schedule}: the most parameters train at once when layers "
             f"{', '.join(str(k + 1) for k in concurrent)} do; grads, optim and activ are theirs "
             "(one gradient buffer per parameter, optimizer state only while a layer trains)"),
            "weights (deep): every layer" + (
                (f" + forward copies of layers 1..{len(table) - 1} in "
                 f"{config.model.forward_copies}")
                if pipelined else " (greedy: no forward copies; finished layers feed the next)"),
        ],
    )
