"""Each neuron's optimal stimulus: the input of a given norm that drives it hardest,
found by projected gradient ascent on the sphere ``||x|| = norm``.

For a linear unit ``h = a w.x`` (RICA) the optimum is ``norm * sign(a) w / ||w||``, which the
tests check the search against; for nonlinear or deeper units only the search gives it. The
norm is the typical norm of the model's inputs, so the stimulus is as strong as a real one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from terabrain.analysis.activations import layer_activations


def maximize_activation(
    model: torch.nn.Module,
    neurons: list[int],
    inputs: int,
    norm: float | torch.Tensor,
    layer: int = 1,
    steps: int = 200,
    step_size: float = 0.3,
    seed: int = 0,
    minimize: Optional[list[bool]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal stimuli of ``neurons`` (one row each, norm ``norm``).

    ``norm``: one radius for all, or one per neuron.
    Returns (stimuli (len(neurons), inputs), start activations, final activations). Each step
    moves along the gradient's component tangent to the sphere by an angle that shrinks
    from ``step_size`` radians to 1% of it (cosine schedule), then returns to the sphere.
    Rows are independent: the model is in eval mode, so nothing mixes examples.
    ``minimize[i]``: find the input that drives neuron ``neurons[i]`` lowest instead.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(neurons), inputs, generator=generator).to(device)
    norm = torch.as_tensor(norm, dtype=x.dtype, device=device).expand(len(neurons))[:, None]
    x = norm * x / x.norm(dim=1, keepdim=True)
    rows = torch.arange(len(neurons), device=device)
    columns = torch.as_tensor(neurons, device=device)

    signs = torch.tensor([-1.0 if m else 1.0 for m in (minimize or [False] * len(neurons))],
                         device=device)

    def activations(points: torch.Tensor) -> torch.Tensor:
        return layer_activations(model, points, layer)[rows, columns]

    with torch.no_grad():
        start = activations(x).cpu()
    for step in range(steps):
        x.requires_grad_(True)
        (gradient,) = torch.autograd.grad((signs * activations(x)).sum(), x)
        x = x.detach()
        radial = (gradient * x).sum(dim=1, keepdim=True) / norm.pow(2)
        tangent = gradient - radial * x
        length = tangent.norm(dim=1, keepdim=True)
        angle = step_size * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        direction = torch.where(length > 0, tangent / length.clamp_min(1e-30), 0.0)
        # A great-circle step of `angle` radians towards the gradient.
        x = x * math.cos(angle) + norm * direction * math.sin(angle)
        x = norm * x / x.norm(dim=1, keepdim=True)
    with torch.no_grad():
        final = activations(x).cpu()
    model.train(was_training)
    return x.detach().cpu(), start, final
