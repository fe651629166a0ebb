"""How much of a network's layer a sparse dictionary keeps (the report of a run with a
``source_network``; Gao et al. 2024, section 4):

- downstream: the network's accuracy and cross-entropy with the layer's output replaced by
  the dictionary's reconstruction ("spliced"), beside the network as it is and beside the
  layer zeroed and replaced by its mean over the training set (the ablations bound what a
  useless reconstruction does). ``loss_recovered`` = (zero - spliced) / (zero - original):
  1 when splicing costs nothing, 0 when it is as bad as zeroing the layer.
- reconstruction: fraction of variance unexplained, L0 and dead latents on held-out
  activations.
- class selectivity: for each class, the best single latent of the dictionary in Le et al.'s
  one-vs-rest test (terabrain.analysis.concepts), beside the best single neuron of the layer
  itself, random directions in the layer (as many as there are latents) and a linear filter
  fitted with the labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from terabrain.analysis.concepts import concept_row

Outputs = Callable[[Callable[[torch.Tensor], torch.Tensor] | None], torch.Tensor]
RANDOM_DIRECTION_RUNS = 1  # each run: as many directions as latents


def downstream(outputs: Outputs, labels: torch.Tensor, layer_mean: torch.Tensor,
               reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``outputs(replace)``: the network's logits on the test examples with the layer's
    (N, values) output replaced by ``replace`` of it (None: unchanged)."""
    conditions = {
        "original": None,
        "spliced": reconstruct,
        "zero_ablation": torch.zeros_like,
        "mean_ablation": lambda layer: layer_mean.to(layer.dtype).expand_as(layer),
    }
    accuracy, loss = {}, {}
    for name, replace_layer in conditions.items():
        logits = outputs(replace_layer)
        accuracy[name] = float((logits.argmax(dim=1) == labels).float().mean())
        loss[name] = float(F.cross_entropy(logits, labels))
    gap = loss["zero_ablation"] - loss["original"]
    return {
        "accuracy": accuracy,
        "loss": loss,
        "loss_increase": loss["spliced"] - loss["original"],
        "loss_recovered": (loss["zero_ablation"] - loss["spliced"]) / gap if gap else float("nan"),
    }


def reconstruction_quality(activations: torch.Tensor, reconstruction: torch.Tensor,
                           codes: torch.Tensor) -> dict:
    """FVU (against the activations' own mean), L0 and latents that never fire."""
    residual = (activations - reconstruction).pow(2).sum()
    variance = (activations - activations.mean(dim=0)).pow(2).sum()
    fired = (codes > 0).any(dim=0)
    return {
        "fvu": float(residual / variance.clamp_min(1e-12)),
        "l0": float((codes > 0).sum(dim=1).float().mean()),
        "latents": codes.shape[1],
        "dead_latents": int((~fired).sum()),
        "dead_fraction": float((~fired).float().mean()),
    }


def random_directions(width: int, count: int, seed: int) -> torch.Tensor:
    """(width, count) unit vectors, uniform on the sphere."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(width, count, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def class_selectivity(codes: torch.Tensor, layer: torch.Tensor, labels: torch.Tensor,
                      names: list[str], seed: int, runs: int = RANDOM_DIRECTION_RUNS) -> list[dict]:
    """One row per class: the held-out accuracy of the best single unit (chosen on the other
    half of the examples) among the dictionary's latents, the layer's neurons, random
    directions and linear filters, and what guessing gets."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    select, held = order[: len(order) // 2], order[len(order) // 2 :]
    codes, layer = codes.double(), layer.double()
    projections = [layer @ random_directions(layer.shape[1], codes.shape[1], seed + 1 + run)
                   for run in range(runs)]
    rows = []
    for number, name in enumerate(names):
        positive = (labels == number).long()
        row = concept_row(
            name, (positive[select], positive[held]), (codes[select], codes[held]),
            [(projected[select], projected[held]) for projected in projections],
            (layer[select], layer[held]),
        )
        rows.append({
            "class": name, "positives": row.positives, "guessing": row.guessing,
            "sae_latent": row.learned, "sae_latent_index": row.learned_neuron,
            "layer_neuron": row.best_pixel, "random_directions": row.random_network,
            "linear_filter": row.linear_filter,
        })
    return rows


@torch.no_grad()
def splice_report(outputs: Outputs, labels: torch.Tensor, train_activations: torch.Tensor,
                  activations: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
                  reconstruct: Callable[[torch.Tensor], torch.Tensor],
                  names: list[str] | None, seed: int) -> dict:
    """The whole report (module docstring) on test examples whose layer activations are
    ``activations`` and labels ``labels``; the mean ablation uses ``train_activations``."""
    codes = encode(activations)
    report = {
        **downstream(outputs, labels, train_activations.mean(dim=0), reconstruct),
        "reconstruction": reconstruction_quality(activations, reconstruct(activations), codes),
    }
    classes = int(labels.max()) + 1
    names = names if names is not None and len(names) >= classes else [str(c) for c in range(classes)]
    report["class_selectivity"] = class_selectivity(codes, activations, labels, names[:classes], seed)
    return report


def summary_lines(report: dict) -> list[str]:
    """The report in a few lines, for the end of `terabrain train`."""
    accuracy, loss = report["accuracy"], report["loss"]
    quality = report["reconstruction"]
    rows = report["class_selectivity"]

    def mean(key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    return [
        "spliced: test accuracy {spliced:.4f} (original {original:.4f}, zero-ablated "
        "{zero_ablation:.4f}, mean-ablated {mean_ablation:.4f})".format(**accuracy),
        (f"spliced: loss {loss['spliced']:.4f} (original {loss['original']:.4f}, +"
        f"{report['loss_increase']:.4f}; {report['loss_recovered']:.3f} of the zero-ablation "
        "loss recovered)"),
        (f"dictionary: held-out FVU {quality['fvu']:.4f}, L0 {quality['l0']:.2f}, dead "
        f"latents {quality['dead_latents']} of {quality['latents']}"),
        (f"class-selective units (one-vs-rest held-out accuracy, mean over {len(rows)} "
        f"classes): best latent {mean('sae_latent'):.4f}, best layer neuron "
        f"{mean('layer_neuron'):.4f}, best random direction {mean('random_directions'):.4f}, "
        f"guessing {mean('guessing'):.4f}"),
    ]
