"""The best-single-neuron test of Le et al. 2012 (Coates et al. 2013's table: faces 88.2% against 64.7%
for guessing and 64.8% for a random network).

Every neuron's activation is thresholded at ``count`` evenly spaced values between its
smallest and largest activation on the selection split; an image is called positive when the
activation is above the threshold. The (neuron, threshold) with the best accuracy on the
selection split is then scored on the held-out split, so the reported number is not inflated
by picking the best of many neurons on the same images.

Polarity: a linear unit's sign is arbitrary (RICA's cost is unchanged when a row of W flips
sign), so by default "positive when below the threshold" is searched too; the same rule is
applied to every baseline (single pixels, random networks). ``both_polarities=False`` gives
Le et al.'s one-sided rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SHRINKAGES = (1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class NeuronChoice:
    neuron: int
    threshold: float
    above: bool
    """True: positive when activation > threshold; False: when activation <= threshold."""
    selection_accuracy: float

    def predict(self, activations: torch.Tensor) -> torch.Tensor:
        above = activations[:, self.neuron] > self.threshold
        return above if self.above else ~above

    def accuracy(self, activations: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(activations) == labels.bool()).float().mean())


def evenly_spaced_thresholds(activations: torch.Tensor, count: int) -> torch.Tensor:
    """(units, count): ``count`` values from each unit's minimum to its maximum."""
    low, high = activations.min(dim=0).values, activations.max(dim=0).values
    steps = torch.linspace(0.0, 1.0, count, dtype=activations.dtype)
    return low[:, None] + (high - low)[:, None] * steps[None, :]


def accuracy_grid(activations: torch.Tensor, labels: torch.Tensor,
                  thresholds: torch.Tensor) -> torch.Tensor:
    """(units, thresholds): accuracy of "positive iff activation > threshold", by counting
    with sorted activations instead of comparing every image with every threshold."""
    labels = labels.bool()
    thresholds = thresholds.contiguous()
    positives = activations[labels].T.contiguous().sort(dim=1).values
    negatives = activations[~labels].T.contiguous().sort(dim=1).values
    positives_above = positives.shape[1] - torch.searchsorted(positives, thresholds, right=True)
    negatives_below = torch.searchsorted(negatives, thresholds, right=True)
    return (positives_above + negatives_below).double() / len(labels)


def best_neuron(activations: torch.Tensor, labels: torch.Tensor, count: int = 100,
                both_polarities: bool = True) -> NeuronChoice:
    """The (neuron, threshold, polarity) most accurate on (activations, labels); ties go to
    the lowest neuron index, then the lowest threshold."""
    activations = activations.double()
    thresholds = evenly_spaced_thresholds(activations, count)
    above = accuracy_grid(activations, labels, thresholds)
    best_above = int(above.argmax())
    choice = divmod(best_above, count), True, float(above.flatten()[best_above])
    if both_polarities:
        below = 1.0 - above  # "<= threshold" predicts exactly the complement
        best_below = int(below.argmax())
        if float(below.flatten()[best_below]) > choice[2]:
            choice = divmod(best_below, count), False, float(below.flatten()[best_below])
    (unit, index), is_above, accuracy = choice
    return NeuronChoice(unit, float(thresholds[unit, index]), is_above, accuracy)


def linear_filters(x: torch.Tensor, labels: torch.Tensor,
                   shrinkages: tuple[float, ...] = SHRINKAGES) -> torch.Tensor:
    """Supervised linear filters for the baseline, one per shrinkage: Fisher's discriminant
    ``(S + s * mean_eigenvalue * I)^-1 (mu_1 - mu_0)`` with S the pooled within-class
    covariance of ``x``. Thresholded like neurons, the best one on the selection split is
    the best a single linear filter does with the labels."""
    x, labels = x.double(), labels.bool()
    centred = torch.cat([x[labels] - x[labels].mean(0), x[~labels] - x[~labels].mean(0)])
    within = centred.T @ centred / max(len(x) - 2, 1)
    scale = float(torch.diagonal(within).mean()) or 1.0
    difference = x[labels].mean(0) - x[~labels].mean(0)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    return torch.stack([torch.linalg.solve(within + s * scale * eye, difference)
                        for s in shrinkages])


def linear_baseline(pixels: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                    count: int, both_polarities: bool, seed: int = 0) -> list[torch.Tensor]:
    """The linear-filter baseline's responses on (selection, held-out), one column. Its
    shrinkage is chosen on one half of the selection split with the filter fitted on the
    other half (a filter fitted and scored on the same images favours the least shrinkage,
    which overfits); the filter is then refitted on the whole selection split."""
    x = pixels[0]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    fit, score = order[: len(x) // 2], order[len(x) // 2 :]
    candidates = linear_filters(x[fit], labels[fit]).T
    chosen = best_neuron(x[score].double() @ candidates, labels[score], count, both_polarities)
    final = linear_filters(x, labels, (SHRINKAGES[chosen.neuron],)).T
    return [p.double() @ final for p in pixels]


@dataclass
class ConceptRow:
    """One line of the concept-neuron table; accuracies are on the held-out split."""

    concept: str
    positives: float
    selection_examples: int
    heldout_examples: int
    guessing: float
    best_pixel: float
    linear_filter: float
    random_network: float
    random_network_runs: list[float]
    learned: float
    learned_selection: float
    learned_neuron: int
    learned_threshold: float
    learned_above: bool

    def as_dict(self) -> dict:
        return asdict(self)


def concept_row(
    concept: str,
    labels: tuple[torch.Tensor, torch.Tensor],
    learned: tuple[torch.Tensor, torch.Tensor],
    random_networks: list[tuple[torch.Tensor, torch.Tensor]],
    pixels: tuple[torch.Tensor, torch.Tensor],
    count: int = 100,
    both_polarities: bool = True,
) -> ConceptRow:
    """Each pair is (selection split, held-out split). ``pixels``: the model's input rows, for
    the best-single-pixel and the linear-filter (Fisher discriminant) baselines."""
    select_y, held_y = (y.long() for y in labels)
    majority = int(select_y.float().mean() >= 0.5)
    choice = best_neuron(learned[0], select_y, count, both_polarities)
    random_runs = [best_neuron(sel, select_y, count, both_polarities).accuracy(held, held_y)
                   for sel, held in random_networks]
    pixel = best_neuron(pixels[0], select_y, count, both_polarities)
    filtered = linear_baseline(pixels, select_y, count, both_polarities)
    linear = best_neuron(filtered[0], select_y, count, both_polarities)
    return ConceptRow(
        concept=concept,
        positives=float(held_y.float().mean()),
        selection_examples=len(select_y),
        heldout_examples=len(held_y),
        guessing=float((held_y == majority).float().mean()),
        best_pixel=pixel.accuracy(pixels[1], held_y),
        linear_filter=linear.accuracy(filtered[1], held_y),
        random_network=sum(random_runs) / len(random_runs) if random_runs else float("nan"),
        random_network_runs=random_runs,
        learned=choice.accuracy(learned[1], held_y),
        learned_selection=choice.selection_accuracy,
        learned_neuron=choice.neuron,
        learned_threshold=choice.threshold,
        learned_above=choice.above,
    )
