"""The one place that knows how to get "the activations of layer N" from a model.

Everything in terabrain.analysis (top stimuli, concept neurons, features, probes, activation
maximization) goes through ``layer_activations``, so a model with more layers needs only this
function to learn about it: single-layer feature learners (RICA, Autoencoder) have layer 1,
their ``encode``; stacked models expose ``encode(x, layer=N)``.
"""

from __future__ import annotations

import inspect

import torch

from terabrain.errors import ConfigError


def layer_count(model: torch.nn.Module) -> int:
    return int(getattr(model, "num_layers", 1))


def check_layer(model: torch.nn.Module, layer: int) -> None:
    count = layer_count(model)
    if not 1 <= layer <= count:
        raise ConfigError(f"--layer {layer}: this model has {count} layer(s); allowed: 1..{count}")


def layer_activations(model: torch.nn.Module, x: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """Hidden activations of ``layer`` (1 = first) for input rows ``x``, shape (N, units).
    Differentiable in ``x`` (activation maximization needs that); wrap in ``torch.no_grad``
    when only values are needed."""
    check_layer(model, layer)
    if "layer" in inspect.signature(model.encode).parameters:
        return model.encode(x, layer=layer)
    return model.encode(x)


@torch.no_grad()
def batched_activations(
    model: torch.nn.Module, x: torch.Tensor, layer: int = 1, batch_size: int = 1024
) -> torch.Tensor:
    """``layer_activations`` over ``x`` in batches, on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    parts = [layer_activations(model, x[i : i + batch_size].to(device), layer).float().cpu()
             for i in range(0, len(x), batch_size)]
    if not parts:  # no rows: still the right number of columns
        return layer_activations(model, x.to(device), layer).float().cpu()
    return torch.cat(parts)
