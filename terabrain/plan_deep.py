"""`terabrain plan` for deep networks (model.kind deep): per-layer parameters and work, and
for every (data x model) mesh the memory per rank and the bytes each rank sends per step.

The network is built on the meta device, so counts are those of the modules that train.
On the model axis (terabrain.parallel.spatial_network, what training does) a locally
connected layer is split by output rows: each rank holds its rows' filters and exchanges
halo rows with its neighbours (``local_layer_blocks``); a dense top layer is split by
hidden unit (its input all-gathered, its reconstruction all-reduced); conv layers are not
split (training refuses them on a model axis; counted here as replicated). Everything is
fp32. Per rank, with b = batch / data:

- weights: the local parameters; plus the same again for the forward copies layer-wise
  training keeps of every layer (seed 000's second instance of each layer).
- gradients: 3x the local weights (a tied layer's W takes part in the encoder, the decoder
  and its row normalization; an estimate, not measured as for the fully connected planner).
- optimizer state: as terabrain.plan (adam 2x, sgd with momentum 1x, ...).
- activations: for every layer at once (the pipelined worst case), 4 B x b x (3 x input +
  3 x codes + post-processed output) of the rank's rows.
- other: the training set when the trainer keeps it in memory (data.source photos/npy).
- sent:model per step: forward and backward of the encoder and of the reconstruction each
  move the halo once (4 halos per local layer); dense layers all-gather their input,
  all-reduce their reconstruction and all-gather its gradient; pooling (kernel - stride
  rows) and LCN (2 (kernel // 2) rows each side) move their halos once (forward copies run
  without gradient).
- sent:data: one ring all-reduce of the local gradients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from terabrain.config.schema import ExperimentConfig, LayerConfig
from terabrain.errors import ConfigError
from terabrain.parallel.spatial import split_evenly
from terabrain.parallel.spatial_network import local_layer_blocks

FP32 = 4


def input_shape_of(config: ExperimentConfig) -> tuple[int, int, int]:
    if config.model.input_shape is not None:
        return tuple(config.model.input_shape)
    data = config.data
    if data.source in ("photos", "face_mix"):  # face_mix is grey (data.color is refused)
        return (3 if data.color else 1, data.patch_size, data.patch_size)
    raise ConfigError(
        "model.input_shape: set (channels, height, width) to plan a deep network on "
        f"data.source {data.source}"
    )


def layer_table(config: ExperimentConfig) -> list[dict]:
    """Per layer: kind, shapes, parameters, forward multiply-adds per example."""
    from terabrain.nn.deep import DeepNetwork, FilterBank

    shape = input_shape_of(config)
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
            "filter_parameters": sum(bank.weight.numel() for bank in layer.banks()),
            # encode + reconstruct, forward; training is about 3x (forward + backward).
            "forward_flops_per_example": 2 * 2 * encoder_macs,
        })
    return table


def _layer_split(spec: LayerConfig, info: dict, model_ranks: int, rows_b: int) -> dict:
    """One layer on ``model_ranks`` ranks: local parameter elements, activation values and
    bytes sent per step, and why it cannot be split that way (empty when it can)."""
    channels, height, width = info["input"]
    maps, out_h, out_w = info["codes"]
    parameters = info["parameters"]
    result = {"local": parameters, "sent": 0.0, "reason": ""}
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
    elif model_ranks > 1 and spec.kind == "dense":
        if maps % model_ranks:
            result["reason"] = f"layer {info['layer']}: {maps} units not divisible by {model_ranks}"
        share = 1.0 / model_ranks
        filters = info["filter_parameters"]
        result["local"] = math.ceil(filters / model_ranks) + parameters - filters
        ring = 2.0 * (model_ranks - 1) / model_ranks
        # All-gather of the input (half a ring all-reduce), all-reduce of the partial
        # reconstruction, all-gather of its rows' gradient (backward).
        result["sent"] += 2.0 * ring * FP32 * rows_b * channels * height * width
    in_values = channels * height * width * (share if spec.kind == "local" else 1.0)
    code_values = maps * out_h * out_w * share
    out_values = math.prod(info["output"]) * share
    result["activation_values"] = rows_b * (3 * in_values + 3 * code_values + out_values)
    return result


def plan_deep(config: ExperimentConfig, devices: int, device_memory: int, batch: Optional[int],
              headroom: float):
    from terabrain.plan import (
        Plan, Split, _divisors, _optimizer_state, _ring_all_reduce, configured_split, data_shape,
        format_count,
    )

    table = layer_table(config)
    total = sum(row["parameters"] for row in table)
    inputs, train_rows = data_shape(config.data)
    if batch is None:
        batch = min(config.train.batch_size or train_rows, train_rows)
    configured = configured_split(config, devices)
    in_memory = config.data.source in ("photos", "npy", "digits")
    splits = []
    for model_ranks in _divisors(devices):
        data_ranks = devices // model_ranks
        rows_b = -(-batch // data_ranks)
        layers = [_layer_split(spec, info, model_ranks, rows_b)
                  for spec, info in zip(config.model.layers, table)]
        reasons = [layer["reason"] for layer in layers if layer["reason"]]
        if batch % data_ranks:
            reasons.append(f"{data_ranks} replicas do not divide batch {batch}")
        local = sum(layer["local"] for layer in layers)
        weights = 2 * FP32 * local  # the network and its forward copies
        gradients = 3 * FP32 * local
        optimizer = FP32 * _optimizer_state(config, local, total)
        activations = FP32 * round(sum(layer["activation_values"] for layer in layers))
        dataset = FP32 * train_rows * inputs if in_memory else 0
        bf16 = 2 * local if config.precision == "bf16" else 0
        memory = weights + gradients + optimizer + activations + dataset + bf16
        model_sent = round(sum(layer["sent"] for layer in layers))
        data_sent = round(_ring_all_reduce(data_ranks, FP32 * (local + 3 * len(table) + 1)))
        splits.append(Split(
            data=data_ranks, model=model_ranks, valid=not reasons, reason="; ".join(reasons),
            rows_per_rank=rows_b, local_parameters=local, weights=weights, gradients=gradients,
            optimizer=optimizer, activations=activations, dataset=dataset, bf16_copy=bf16,
            total=memory, fits=not reasons and memory <= device_memory * headroom,
            model_axis_sent=model_sent, data_axis_sent=data_sent, sent=model_sent + data_sent,
            configured=configured == (data_ranks, model_ranks),
        ))
    fitting = [s for s in splits if s.fits]
    if fitting:
        min(fitting, key=lambda s: (s.sent, s.total)).recommended = True
    description = "deep " + " -> ".join(
        ["x".join(map(str, table[0]["input"]))]
        + [f"{row['kind']} {'x'.join(map(str, row['output']))}" for row in table]
    )
    plan = Plan(
        experiment=config.name, model=description, inputs=inputs, hidden=table[-1]["codes"][0],
        parameters=total, parameter_table=[], batch=batch, train_rows=train_rows,
        optimizer=config.optimizer.name, evaluations_per_step=1, devices=devices,
        device_memory=device_memory, headroom=headroom, splits=splits, layers=table,
    )
    best = plan.recommended
    plan.notes = [
        (f"recommended: parallel.data={best.data} parallel.model={best.model} (fits, sends the least)"
         if best else f"no split fits in {plan.usable_memory:,} bytes per device: use more devices"),
        "layers: " + "; ".join(
            f"{row['layer']} {row['kind']} {format_count(row['parameters'])} parameters, "
            f"{row['forward_flops_per_example'] / 1e9:.2f} GFLOP per example forward"
            for row in table),
        "model axis: local layers split by output rows with halo exchange, dense layers by "
        "hidden unit, conv layers replicated; weights include layer-wise training's forward "
        "copies; gradients 3x local weights (estimate); activations of every layer at once "
        "(pipelined worst case)",
        "other: the training set when the trainer holds it in memory (data.source photos, npy, "
        "digits); streamed sources hold only their prefetch buffers",
    ]
    return plan
