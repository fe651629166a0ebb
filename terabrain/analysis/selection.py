"""Judging a network's concept neuron from the selection split alone.

``best_neuron``'s selection accuracy is a maximum over neurons and thresholds scored on the
images that chose them, so it grows with the number of neurons even when none is better. To
compare networks (or settings) without touching the held-out split, ``inner_accuracy`` cuts
the selection split in two stratified halves, chooses on one half and scores on the other,
both ways, over many cuts: an estimate of held-out accuracy from selection images only, fair
between networks of different sizes (docs/analysis.md, "A steadier face neuron").
"""

from __future__ import annotations

import torch

from terabrain.analysis.concepts import best_neuron


def stratified_halves(labels: torch.Tensor, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets, each with half of every class (rounded down for the first)."""
    first, second = [], []
    for value in labels.unique():
        rows = torch.nonzero(labels == value).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        first.append(rows[: len(rows) // 2])
        second.append(rows[len(rows) // 2 :])
    return torch.cat(first), torch.cat(second)


def inner_accuracy(activations: torch.Tensor, labels: torch.Tensor, cuts: int = 50,
                   thresholds: int = 100, seed: int = 0) -> float:
    """Mean accuracy of the best (neuron, threshold) chosen on one half of the selection
    split and scored on the other half, both ways, over ``cuts`` random cuts."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.long()
    scores = []
    for _ in range(cuts):
        a, b = stratified_halves(labels, generator)
        for pick, score in ((a, b), (b, a)):
            choice = best_neuron(activations[pick], labels[pick], thresholds)
            scores.append(choice.accuracy(activations[score], labels[score]))
    return sum(scores) / len(scores)
