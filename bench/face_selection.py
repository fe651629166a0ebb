"""Face-neuron figures of trained runs, selection split first (docs/analysis.md, "faces-rica").

Candidate settings are compared on the face test's *selection* split only; the held-out split
is read only with ``--heldout``, once a winner is fixed. Two selection figures per run:

- ``best``: the best (neuron, threshold) accuracy on the whole selection split, as
  ``terabrain analyze`` reports it. It is a maximum over neurons, so it grows with the number
  of neurons even when none is better; it is shown, not used to choose.
- ``inner``: the selection split cut in two halves at random (stratified), neuron and threshold
  chosen on one half and scored on the other, both ways, averaged over 50 cuts. An honest
  estimate from the selection images alone, fair between networks of different sizes; this
  is the one candidates are ranked by.

Usage: python bench/face_selection.py RUN_DIR... [--layer N] [--heldout]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from terabrain.analysis.activations import batched_activations
from terabrain.analysis.concepts import best_neuron
from terabrain.analysis.datasets import load_analysis_data
from terabrain.analysis.features import model_rows
from terabrain.analysis.loaded_run import load_run
from terabrain.analysis.selection import inner_accuracy


def figures(run_dir: Path, layer: int, heldout: bool) -> dict:
    run = load_run(run_dir)
    data = load_analysis_data("faces", run)
    selection = model_rows(run, data, "train")
    labels = torch.as_tensor(data.train.labels).long()
    learned = batched_activations(run.model, selection, layer)
    random = batched_activations(run.random_model(seed=run.config.seed + 1000), selection, layer)
    out = {
        "run": str(run_dir), "layer": layer, "units": learned.shape[1],
        "selection_best": best_neuron(learned, labels).selection_accuracy,
        "selection_inner": inner_accuracy(learned, labels),
        "random_selection_inner": inner_accuracy(random, labels),
        "pixel_selection_inner": inner_accuracy(selection, labels),
    }
    if heldout:
        rows = model_rows(run, data, "test")
        held_labels = torch.as_tensor(data.test.labels).long()
        choice = best_neuron(learned, labels)
        out["heldout_learned"] = choice.accuracy(
            batched_activations(run.model, rows, layer), held_labels)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--heldout", action="store_true",
                        help="also score the selection split's choice on the held-out split")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        print(json.dumps(figures(run_dir, args.layer, args.heldout)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
