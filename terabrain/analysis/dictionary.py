"""`terabrain analyze RUN` for a run trained on a network's layer (``source_network``, e.g.
fashion-cnn-sae): the learner is a dictionary of that layer, and its inputs are
activations, not images. So instead of filters and optimal stimuli the report shows, per
latent, its density (the fraction of examples it fires on), its top-activating examples as
the network's own input images, and the class it is selective for; then the concept table
(terabrain.analysis.concepts: each class's best latent beside the best neuron of the layer,
a linear filter and dictionaries with random weights) and the spliced figures of training
(results.json, terabrain.analysis.splice).

The examples are the run's own held-out examples with their labels, rebuilt from the config
as in training (``--data NAME`` takes another labelled set's test split instead).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from terabrain.analysis import figures
from terabrain.analysis.activations import batched_activations
from terabrain.analysis.concepts import concept_row
from terabrain.analysis.document import (
    Code,
    Document,
    Heading,
    Paragraph,
    Picture,
    Table,
)
from terabrain.analysis.loaded_run import LoadedRun
from terabrain.analysis.topk import neuron_stats
from terabrain.data.sources import source_of
from terabrain.errors import ConfigError
from terabrain.files import write_text_atomically
from terabrain.learners.registry import learner_of

if TYPE_CHECKING:
    from terabrain.analysis.report import AnalyzeOptions


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _examples(run: LoadedRun, options: AnalyzeOptions):
    """(images to draw, model input rows, labels, class names, signed, description)."""
    if options.data is not None:
        from terabrain.analysis.datasets import load_analysis_data

        data = load_analysis_data(options.data, run, options.max_examples, options.seed)
        split = data.split(options.split)
        if split.labels is None:
            raise ConfigError(f"--data {options.data}: has no labels; a dictionary's report "
                              "needs labelled examples")
        rows = torch.from_numpy(np.ascontiguousarray(split.images, np.float32))
        inputs = run.from_prepared(rows) if data.preprocessed else run.to_model_input(split.images)
        return (split.images, inputs, torch.as_tensor(split.labels).long(), data.classes,
                data.preprocessed, f"`{options.data}` {options.split} split")
    from terabrain.data.prepare import prepare_data

    prepared = prepare_data(run.config.data, run.config.seed)
    if prepared.holdout_y is None:
        raise ConfigError("analyze: the run's held-out examples have no labels; give --data "
                          "with a labelled set (fashion-mnist, digits, faces)")
    chosen = np.arange(len(prepared.holdout_x))
    if options.max_examples is not None and len(chosen) > options.max_examples:
        chosen = np.sort(np.random.default_rng(options.seed).permutation(len(chosen))
                         [: options.max_examples])
    rows = prepared.holdout_x[chosen]
    images = rows.numpy().reshape(len(rows), *run.image_shape)
    classes = source_of(run.config.data).class_names(run.config.data)
    signed = run.config.data.remove_mean or run.whitening is not None
    return (images, run.from_prepared(rows), prepared.holdout_y[chosen].long(), classes, signed,
            "the run's held-out examples")


def latent_table(codes: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """Per latent: density, the class whose examples it answers most (highest mean
    activation) and that class's share of its mean activations over classes (1 / classes:
    no preference; 1: it fires for that class only)."""
    density = (codes > 0).double().mean(dim=0)
    means = torch.stack([codes[labels == c].double().mean(dim=0) if (labels == c).any()
                         else torch.zeros(codes.shape[1], dtype=torch.float64)
                         for c in range(classes)])
    total = means.sum(dim=0)
    best = means.argmax(dim=0)
    share = torch.where(total > 0, means.max(dim=0).values / total.clamp_min(1e-300),
                        torch.zeros_like(total))
    return {"density": density, "class": best, "share": share}


def analyze_dictionary(run: LoadedRun, options: AnalyzeOptions,
                       command_line: Sequence[str] | None, started: float) -> dict:
    config = run.config
    images, inputs, labels, names, signed, description = _examples(run, options)
    classes = int(labels.max()) + 1
    names = list(names) if names and len(names) >= classes else [str(c) for c in range(classes)]
    codes = batched_activations(run.model, inputs)
    table = latent_table(codes, labels, classes)
    stats = neuron_stats(run.model, inputs, 1, options.top_k)
    out = run.run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)

    document = Document(f"What {config.name} learned")
    section = config.source_network
    document.add(Paragraph(
        f"Run `{run.run_dir}`: {learner_of(config).describe(config)} on the {inputs.shape[1]} "
        f"activations of layer `{section.layer}` of `{section.model}`, over {len(inputs)} "
        f"examples ({description})."),
        Code("terabrain " + " ".join(shlex.quote(a) for a in command_line)
             if command_line else f"terabrain analyze {run.run_dir}"))
    summary: dict = {"run": str(run.run_dir), "experiment": config.name, "examples": len(inputs),
                     "data": options.data or "holdout",
                     "options": {k: (list(v) if isinstance(v, tuple) else v)
                                 for k, v in vars(options).items()}}
    summary["splice"] = _splice_section(document, run)

    # Density.
    density = table["density"]
    dead = int((density == 0).sum())
    figures.density_histogram(density.numpy(), out / "density.png")
    document.add(Heading("Latent density"), Picture(
        "density.png", "fraction of the examples each latent fires on (log scale)"),
        Paragraph(f"{dead} of {len(density)} latents never fire on these examples; the median "
                  f"density of the others is {float(density[density > 0].median()) if dead < len(density) else 0:.4f} "
                  f"(k / latents = {config.model.k / len(density):.4f} on average)."))

    # The most class-selective latents and their top examples.
    # A latent that fires on one example is trivially "selective"; rank those that fire on
    # at least a quarter of the mean density (k / latents).
    frequent = density >= 0.25 * config.model.k / len(density)
    score = torch.where(frequent, table["share"], torch.full_like(table["share"], -1.0))
    chosen = [j for j in score.argsort(descending=True, stable=True)[: options.neurons].tolist()
              if frequent[j]]
    _latent_rows(document, out, chosen, stats, table, images, labels, names, signed,
                 "top_latents.png", f"The {len(chosen)} most class-selective latents "
                 f"(of those firing on at least {_pct(0.25 * config.model.k / len(density))} "
                 "of the examples)")

    # The concept table: each class's best single latent.
    concepts = _concepts(run, options, codes, inputs, labels, names)
    summary["concepts"] = concepts
    _concept_section(document, options, concepts)
    concept_latents = [row["learned_neuron"] for row in concepts]
    _latent_rows(document, out, concept_latents, stats, table, images, labels, names, signed,
                 "concept_latents.png", "Each class's best latent (concept table)")

    stages = figures.learning_curves(run.run_dir / "metrics.jsonl", out / "learning_curves.png")
    document.add(Heading("Learning curves"))
    document.add(Picture("learning_curves.png", "logged losses and their terms against the "
                         "step, per training stage") if stages else Paragraph("No metrics.jsonl."))

    summary["latents"] = [
        {"latent": j, "density": float(density[j]), "class": names[int(table["class"][j])],
         "class_share": float(table["share"][j]),
         "top_indices": [i for i in stats.top_indices[j].tolist() if i >= 0],
         "top_values": [v for v, i in zip(stats.top_values[j].tolist(),
                                          stats.top_indices[j].tolist()) if i >= 0]}
        for j in range(codes.shape[1])]
    summary["dead_latents"] = dead
    summary["seconds"] = time.perf_counter() - started
    write_text_atomically(out / "analysis.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomically(out / "report.md", document.markdown())
    write_text_atomically(out / "report.html", document.html())
    return summary


def _splice_section(document: Document, run: LoadedRun) -> dict | None:
    path = run.run_dir / "results.json"
    splice = json.loads(path.read_text()).get("splice") if path.is_file() else None
    if not splice or "skipped" in splice:
        return None
    accuracy, loss = splice["accuracy"], splice["loss"]
    quality = splice["reconstruction"]
    names = [("original", "the network"), ("spliced", "layer replaced by the reconstruction"),
             ("zero_ablation", "layer zeroed"), ("mean_ablation", "layer replaced by its mean")]
    document.add(
        Heading("The reconstruction spliced into the network"),
        Paragraph("On the run's held-out examples (results.json, computed when training "
                  f"ended): held-out FVU {quality['fvu']:.4f}, L0 {quality['l0']:.2f}, "
                  f"{quality['dead_latents']} of {quality['latents']} latents dead; the "
                  f"spliced loss is {splice['loss_increase']:+.4f} from the original, "
                  f"{splice['loss_recovered']:.3f} of the loss that zeroing the layer costs "
                  "recovered."),
        Table(["network", "test accuracy", "cross-entropy"],
              [[label, _pct(accuracy[key]), f"{loss[key]:.4f}"] for key, label in names]))
    return splice


def _latent_rows(document, out, latents, stats, table, images, labels, names, signed,
                 file_name: str, title: str) -> None:
    if not latents:
        return
    stimuli, captions, row_labels = [], [], []
    for j in latents:
        indices = [i for i in stats.top_indices[j].tolist() if i >= 0]
        stimuli.append([images[i] for i in indices] or [np.zeros_like(images[0])])
        captions.append([f"{v:.2f} ({names[int(labels[i])]})"
                         for v, i in zip(stats.top_values[j].tolist(), indices)] or [""])
        row_labels.append(f"latent {j}\n{names[int(table['class'][j])]}")
    figures.neuron_rows(stimuli, None, row_labels, out / file_name, signed, captions)
    document.add(Heading(title), Picture(file_name, "rows: latents, their top-activating "
                                         "examples first, activation and label under each"),
                 Table(["latent", "density", "selective for", "class share", "top activation"],
                       [[str(j), f"{float(table['density'][j]):.4f}",
                         names[int(table["class"][j])], _pct(float(table["share"][j])),
                         f"{float(stats.top_values[j, 0]):.3f}"] for j in latents]))


def _concepts(run, options, codes, inputs, labels, names) -> list[dict]:
    """One concept row per class on a seeded half/half split of the examples."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(options.seed))
    select, held = order[: len(order) // 2], order[len(order) // 2 :]
    randoms = []
    for index in range(options.random_networks):
        random_codes = batched_activations(run.random_model(run.config.seed + 1000 + index), inputs)
        randoms.append((random_codes[select], random_codes[held]))
    rows = []
    for number, name in enumerate(names):
        positive = (labels == number).long()
        row = concept_row(name, (positive[select], positive[held]), (codes[select], codes[held]),
                          randoms, (inputs[select], inputs[held]), options.thresholds)
        rows.append(row.as_dict())
    return rows


def _concept_section(document: Document, options, concepts: list[dict]) -> None:
    document.add(Heading("Class-selective latents (the best-single-neuron test of Le et al. 2012)"),
                 Paragraph(
        f"For each class, one-vs-rest: every unit thresholded at {options.thresholds} evenly "
        "spaced values (above or below), the best (unit, threshold) chosen on one half of the "
        "examples and scored on the other. Layer neuron: the same search over the network's "
        "own units of that layer. Linear filter: a Fisher discriminant of the layer with the "
        "labels (supervised). Random dictionary: the autoencoder's architecture with random "
        f"weights on the same layer (mean over {options.random_networks} seeds)."))
    document.add(Table(
        ["class", "positives", "guessing", "layer neuron", "linear filter (supervised)",
         "random dictionary", "best latent", "latent"],
        [[r["concept"], _pct(r["positives"]), _pct(r["guessing"]), _pct(r["best_pixel"]),
          _pct(r["linear_filter"]), _pct(r["random_network"]), _pct(r["learned"]),
          str(r["learned_neuron"])] for r in concepts]))
