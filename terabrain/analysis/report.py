"""`terabrain analyze RUN_DIR`: what a trained network learned, as a report in
RUN_DIR/analysis/ (report.html and report.md with their PNGs, and analysis.json).

Sections: first-layer filters, reconstructions beside inputs, learning curves, the top-k
stimuli of the most selective neurons of a layer over a data set (computed in parallel over
ranks under torchrun), each of those neurons' optimal stimulus, and the concept-neuron table
(terabrain.analysis.concepts) for faces and for each Fashion-MNIST class.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from terabrain.analysis import figures
from terabrain.analysis.activations import batched_activations, check_layer
from terabrain.analysis.concepts import ConceptRow, concept_row
from terabrain.analysis.datasets import AnalysisData, load_analysis_data
from terabrain.analysis.document import Code, Document, Heading, Paragraph, Picture, Table
from terabrain.analysis.features import model_rows
from terabrain.analysis.filters import save_filter_grid
from terabrain.analysis.loaded_run import LoadedRun, load_run
from terabrain.analysis.maximize import maximize_activation
from terabrain.analysis.topk import neuron_stats
from terabrain.data.sources import source_of
from terabrain.errors import ConfigError
from terabrain.files import write_text_atomically
from terabrain.learners.registry import learner_of
from terabrain.parallel.launch import is_main_rank

CONCEPT_SETS = ("faces", "fashion-mnist")


@dataclass
class AnalyzeOptions:
    layer: int = 1
    data: Optional[str] = None  # default: faces for a face_mix run, else the run's holdout
    split: str = "test"
    top_k: int = 5
    neurons: int = 8
    concepts: tuple[str, ...] = CONCEPT_SETS
    thresholds: int = 100
    random_networks: int = 3
    max_examples: int = 10000
    maximize_steps: int = 200
    seed: int = 0




def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _standard_error(accuracy: float, count: int) -> float:
    return (accuracy * (1 - accuracy) / max(count, 1)) ** 0.5


def _pictures(run: LoadedRun, data: AnalysisData, images: np.ndarray) -> tuple[np.ndarray, bool]:
    """Images to draw for rows of a split, and whether they are signed (drawn mid-grey 0)."""
    if data.preprocessed:
        signed = run.config.data.remove_mean or run.whitening is not None
        return images.reshape(len(images), *run.shape), signed
    return images, False


def _concepts(run: LoadedRun, options: AnalyzeOptions, notes: list[str]) -> list[tuple[ConceptRow, np.ndarray, torch.Tensor]]:
    """Concept rows, each with its held-out images and learned held-out activations."""
    rows = []
    for name in options.concepts:
        try:
            data = load_analysis_data(name, run, options.max_examples, options.seed)
        except ConfigError as error:  # a missing optional data set is a note, not a failure
            notes.append(f"{name}: skipped ({error})")
            continue
        selection, heldout = model_rows(run, data, "train"), model_rows(run, data, "test")
        learned = [batched_activations(run.model, x, options.layer) for x in (selection, heldout)]
        randoms = []
        for index in range(options.random_networks):
            network = run.random_model(seed=run.config.seed + 1000 + index)
            randoms.append([batched_activations(network, x, options.layer)
                            for x in (selection, heldout)])
        y_select = torch.as_tensor(data.train.labels)
        y_held = torch.as_tensor(data.test.labels)
        concepts = [("faces", 1)] if name == "faces" else list(
            (f"{name}: {label}", index) for index, label in enumerate(data.classes))
        for concept, positive in concepts:
            row = concept_row(
                concept,
                ((y_select == positive).long(), (y_held == positive).long()),
                (learned[0], learned[1]),
                [(sel, held) for sel, held in randoms],
                (selection, heldout),
                options.thresholds,
            )
            rows.append((row, data.test.images, learned[1]))
    return rows


def analyze(run_dir: Path, options: AnalyzeOptions = AnalyzeOptions(),
            command_line: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Write the report; returns analysis.json's content on rank 0 (None on other ranks).
    Every rank must call this under torchrun: the top-k pass is split across ranks.

    ``command_line``: the arguments of the ``terabrain`` command that asked for the report
    (``["analyze", RUN_DIR, ...]``), which the report quotes so that it can be made again;
    without it the report quotes ``terabrain analyze RUN_DIR``."""
    started = time.perf_counter()
    run = load_run(run_dir)
    check_layer(run.model, options.layer)
    if run.network is not None:  # a dictionary of a network's layer: its inputs are not images
        from terabrain.analysis.dictionary import analyze_dictionary

        return analyze_dictionary(run, options, command_line, started) if is_main_rank() else None
    torch.manual_seed(options.seed)
    data_name = options.data or source_of(run.config.data).analysis_data
    data = load_analysis_data(data_name, run, options.max_examples, options.seed)
    split = data.split(options.split)
    rows = model_rows(run, data, options.split)
    stats = neuron_stats(run.model, rows, options.layer, options.top_k)
    if not is_main_rank():
        return None

    out = run.run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    config = run.config
    summary: dict = {"run": str(run.run_dir), "experiment": config.name, "layer": options.layer,
                     "data": data_name, "split": options.split, "examples": len(rows),
                     "options": {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in vars(options).items()}}
    document = Document(f"What {config.name} learned")
    document.add(Paragraph(
        f"Run `{run.run_dir}`: {_describe(run.model, config)} on "
        f"{'x'.join(map(str, run.shape))} inputs ({config.data.source}"
        f"{', mean removed' if config.data.remove_mean else ''}"
        f"{', ZCA-whitened' if run.whitening is not None else ''}). Layer {options.layer}; "
        f"top stimuli over `{data_name}` ({options.split} split, {len(rows)} examples: "
        f"{data.description})."),
        Code("terabrain " + " ".join(shlex.quote(a) for a in command_line)
             if command_line else f"terabrain analyze {run.run_dir}"))

    # First-layer filters.
    if hasattr(run.model, "first_layer_filters"):  # deep: a sample of a local layer's banks
        filters, filter_shape = run.model.first_layer_filters()
    else:
        filters, filter_shape = run.model.filters(), run.shape
    save_filter_grid(out / "filters.png", filters, filter_shape)
    document.add(Heading("First-layer filters"),
                 Picture("filters.png", f"{len(filters)} first-layer filters, each "
                         "scaled to its own largest magnitude, zero mid-grey"
                         + (" (colour inputs drawn in colour)" if run.colour else "")))
    results_path = run.run_dir / "results.json"
    filter_stats = json.loads(results_path.read_text()).get("features", {}).get("filters") \
        if results_path.exists() else None
    if filter_stats:
        document.add(Paragraph(
            "On held-out training patches (results.json): spatial spread "
            f"{filter_stats['spatial_spread_px']:.2f} px (random filters "
            f"{filter_stats['random_spatial_spread_px']:.2f}), response kurtosis "
            f"{filter_stats['response_kurtosis']:.2f} (random {filter_stats['random_response_kurtosis']:.2f})."))

    # Reconstructions.
    signed = config.data.remove_mean or run.whitening is not None
    sample = rows[:10]
    with torch.no_grad():
        if hasattr(run.model, "reconstruct"):  # deep: the first layer's reconstruction
            reconstruction = run.model.reconstruct(sample)
        else:
            _, reconstruction = run.model(sample)
    error = float((reconstruction - sample).pow(2).sum(1).mean() / sample.pow(2).sum(1).mean())
    summary["relative_reconstruction_error"] = error
    figures.reconstructions(sample.numpy().reshape(len(sample), *run.shape),
                            reconstruction.numpy().reshape(len(sample), *run.shape),
                            out / "reconstructions.png", signed)
    document.add(Heading("Reconstructions"), Picture(
        "reconstructions.png", f"the first {len(sample)} `{data_name}` examples as the model "
        "sees them (top) and their reconstructions (bottom), each pair on the input's scale"),
        Paragraph(f"Relative squared reconstruction error on them: {error:.3f}."))

    # Learning curves.
    stages = figures.learning_curves(run.run_dir / "metrics.jsonl", out / "learning_curves.png")
    document.add(Heading("Learning curves"))
    document.add(Picture("learning_curves.png", "logged losses and their terms against the step, "
                         "per training stage") if stages else Paragraph("No metrics.jsonl."))

    # Top stimuli and optimal stimuli of the most selective neurons.
    selectivity = stats.selectivity()
    chosen = selectivity.argsort(descending=True, stable=True)[: options.neurons].tolist()
    # Each neuron's optimal stimulus has the norm of its best real stimulus, so the two
    # activations compare directly: the optimum must be at least the top activation.
    norm = rows[stats.top_indices[chosen, 0]].norm(dim=1)
    optimal, start, final = maximize_activation(
        run.model, chosen, run.inputs, norm, options.layer, options.maximize_steps,
        seed=options.seed)
    images, signed_images = _pictures(run, data, split.images)
    labels = split.labels
    captions = [[f"{float(v):.2f}" + (f" ({data.classes[labels[i]]})" if labels is not None
                 and data.classes else "") for v, i in zip(stats.top_values[n], stats.top_indices[n]) if i >= 0]
                for n in chosen]
    figures.neuron_rows(
        [[images[i] for i in stats.top_indices[n].tolist() if i >= 0] for n in chosen],
        [x.numpy().reshape(run.shape) for x in optimal],
        [f"unit {n}\nz={float(selectivity[n]):.1f}" for n in chosen],
        out / "top_stimuli.png", signed_images, captions)
    neurons = []
    for position, n in enumerate(chosen):
        neurons.append({"unit": n, "selectivity": float(selectivity[n]),
                        "mean": float(stats.mean()[n]), "std": float(stats.std()[n]),
                        "top_values": stats.top_values[n].tolist(),
                        "top_indices": stats.top_indices[n].tolist(),
                        "optimal_norm": float(norm[position]),
                        "optimal_start": float(start[position]),
                        "optimal_final": float(final[position])})
    summary["neurons"] = neurons
    document.add(
        Heading(f"Top-{options.top_k} stimuli of the {len(chosen)} most selective layer-{options.layer} neurons"),
        Paragraph(
            f"Over {stats.count} `{data_name}` {options.split} examples. Selectivity z: how many "
            "standard deviations a neuron's top-k responses stand above its mean response. The "
            "last column is the neuron's optimal stimulus: the input maximizing its activation "
            "among inputs with the norm of its best stimulus, found by projected gradient "
            f"ascent on that sphere ({options.maximize_steps} steps from a random input), so "
            "its activation can be compared with the top stimulus's. "
            + ("Stimuli are shown as the model sees them (whitened), as in Ni et al. 2015 fig. 5."
               if signed_images else "Stimuli are shown as images (before preprocessing).")),
        Picture("top_stimuli.png", "rows: neurons, best stimulus first, activation under each; "
                "right: optimal stimulus"),
        Table(["unit", "selectivity z", "mean", "std", "top activation", "norm",
               "optimal stimulus: activation (random start -> end)"],
              [[str(r["unit"]), f"{r['selectivity']:.2f}", f"{r['mean']:.3f}", f"{r['std']:.3f}",
                f"{r['top_values'][0]:.3f}", f"{r['optimal_norm']:.2f}",
                f"{r['optimal_start']:.3f} -> {r['optimal_final']:.3f}"]
               for r in neurons]))

    # The concept-neuron table.
    notes: list[str] = []
    concept_rows = _concepts(run, options, notes) if options.concepts else []
    summary["concepts"] = [row.as_dict() for row, _, _ in concept_rows]
    summary["concept_notes"] = notes
    if options.concepts:
        _concept_section(document, run, options, concept_rows, notes, out)
    summary["evaluation"] = _evaluation_section(document, run.run_dir)
    summary["seconds"] = time.perf_counter() - started
    write_text_atomically(out / "analysis.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomically(out / "report.md", document.markdown())
    write_text_atomically(out / "report.html", document.html())
    return summary


def _evaluation_section(document: Document, run_dir: Path) -> list[dict]:
    """The rows of `terabrain evaluate` (RUN/evaluation.json), when the run was evaluated."""
    from terabrain.analysis.evaluate import read_evaluation

    rows = read_evaluation(run_dir)
    if not rows:
        return []
    protocol = rows[0].get("protocol", {})
    document.add(
        Heading("Single-layer evaluation (Coates, Lee & Ng 2011)"),
        Paragraph(
            f"`terabrain evaluate` on {protocol.get('data', '?')} "
            f"({protocol.get('train_examples', '?')} train / {protocol.get('test_examples', '?')} "
            f"test images): the encoder at every {protocol.get('patch_size', '?')}-pixel patch "
            "position (stride 1) after the run's patch preprocessing, nonlinearity "
            f"`{protocol.get('nonlinearity', '?')}` (threshold {protocol.get('threshold', 0):g}), "
            f"{_pooling(protocol.get('pool_grid', 2))}, "
            "standardised, L2 logistic regression with the penalty chosen on a validation part "
            "of the training split; the test split scored once. Mean ± standard deviation over "
            f"{protocol.get('seeds', '?')} seeds."),
        Table(["features", "K", "features per image", "test accuracy"],
              [[r["features"], str(r["k"]), str(r.get("feature_count", "")),
                f"{100 * r['accuracy_mean']:.2f}% ± {100 * r['accuracy_std']:.2f}"
                if r["accuracy_mean"] is not None else "not scored (validation only)"]
               for r in rows]))
    return [{key: r[key] for key in ("features", "k", "accuracy_mean", "accuracy_std")} for r in rows]


def _concept_section(document: Document, run: LoadedRun, options: AnalyzeOptions,
                     concept_rows, notes: list[str], out: Path) -> None:
    document.add(Heading("Concept neurons (the best-single-neuron test of Le et al. 2012)"),
                 Paragraph(
        f"For each neuron of layer {options.layer}, {options.thresholds} evenly spaced thresholds "
        "between its smallest and largest activation; an image is called positive above the "
        "threshold (or below: a linear unit's sign is arbitrary, and every baseline gets the same "
        "choice). The best (neuron, threshold) is chosen on the selection split and its accuracy "
        "reported on the held-out split. Guessing: the selection split's majority class. Best "
        "pixel: the same search over the model's input values. Linear filter: a Fisher "
        "discriminant of the model's input, computed with the labels of the selection split "
        "(its shrinkage chosen by a split of the selection split) and thresholded like a "
        "neuron: a supervised baseline, unlike the others. Random network: the same architecture with "
        f"random weights, mean over {options.random_networks} seeds. Le et al. 2012's "
        "network, as Coates et al. 2013 report it: faces 88.2% against 64.7% guessing and 64.8% random."))
    table = []
    for row, _, _ in concept_rows:
        beats = row.learned > row.random_network and row.learned > row.best_pixel
        table.append([row.concept, _pct(row.positives), f"{row.selection_examples}/{row.heldout_examples}",
                      _pct(row.guessing), _pct(row.best_pixel), _pct(row.linear_filter),
                      _pct(row.random_network),
                      ("**" + _pct(row.learned) + "**") if beats else _pct(row.learned),
                      f"{row.learned_neuron} ({'>' if row.learned_above else '<='} "
                      f"{row.learned_threshold:.3g}; selection {_pct(row.learned_selection)})"])
    document.add(Table(["concept", "positives", "selection/held-out", "guessing", "best pixel",
                        "linear filter (supervised)", "random network", "learned network",
                        "neuron (rule; selection acc.)"], table))
    for note in notes:
        document.add(Paragraph(f"Not run: {note}."))
    faces = [row for row, _, _ in concept_rows if row.concept == "faces"]
    if faces:
        face = faces[0]
        verdict = "beats" if face.learned > face.random_network else "does not beat"
        verdict_pixel = "beats" if face.learned > face.best_pixel else "does not beat"
        document.add(Paragraph(
            f"**Faces:** the learned network's best neuron is right on {_pct(face.learned)} of the "
            f"held-out images; it {verdict} the random network ({_pct(face.random_network)}) and "
            f"{verdict_pixel} the best single pixel ({_pct(face.best_pixel)}); guessing gives "
            f"{_pct(face.guessing)}, a supervised linear filter {_pct(face.linear_filter)}. "
            f"Only {face.heldout_examples} held-out images: one image is "
            f"{100 / face.heldout_examples:.1f} points, and the binomial standard error of "
            f"the learned accuracy is {_pct(_standard_error(face.learned, face.heldout_examples))}, "
            "so differences of a few points are within chance."))
    if concept_rows:
        k = options.top_k
        stimuli, labels, captions = [], [], []
        optimal = maximize_activation(run.model, [r.learned_neuron for r, _, _ in concept_rows],
                                      run.inputs, 1.0, options.layer, options.maximize_steps,
                                      seed=options.seed,
                                      minimize=[not r.learned_above for r, _, _ in concept_rows])[0]
        for row, images, activations in concept_rows:
            values = activations[:, row.learned_neuron]
            order = values.argsort(descending=row.learned_above, stable=True)[:k]
            stimuli.append([images[i] for i in order.tolist()])
            captions.append([f"{float(values[i]):.2f}" for i in order.tolist()])
            labels.append(f"{row.concept}\nunit {row.learned_neuron}")
        optimal = [x.numpy().reshape(run.shape) for x in optimal]
        figures.neuron_rows(stimuli, optimal, labels, out / "concept_neurons.png", False, captions)
        document.add(Picture("concept_neurons.png", f"each concept's chosen neuron: its top-{k} "
                             "held-out images (most negative first for a '<=' rule) and its "
                             "optimal stimulus (the minimizing one for a '<=' rule)"))


def _describe(model: torch.nn.Module, config) -> str:
    return learner_of(config).describe(config)


def _pooling(grid: int) -> str:
    """The pooling of an evaluation with ``--pool-grid grid``, in words."""
    if grid == 2:
        return "sum-pooled over four quadrants"
    if grid == 1:
        return "summed over every position (no grid)"
    return f"sum-pooled over a {grid} x {grid} grid (not the protocol's quadrants)"
