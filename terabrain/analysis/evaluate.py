"""`terabrain evaluate RUN`: the single-layer protocol of Coates, Lee & Ng 2011 on a labelled
set, for the run's first-layer encoder and, in the same run with the same K, three baselines:
the pixels, random unit-norm filters and k-means with the triangle activation.

For each feature set and seed: features of the training and test images
(terabrain.analysis.single_layer), then the L2 logistic probe (terabrain.analysis.probe):
the penalty is chosen on a validation part cut from the training split (seeded), the probe
refitted on the whole training split, and the test split scored once, after the choice.
The seed also draws the random filters and k-means' initial centroids and patches; the
learned encoder is the run's own, so its spread comes from the validation split alone.

Rows go to RUN/evaluation.json (one object per row: features, k, accuracy_mean,
accuracy_std, and the details) and into `terabrain analyze`'s report.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from terabrain.analysis.datasets import load_analysis_data
from terabrain.analysis.loaded_run import LoadedRun, load_run
from terabrain.analysis.probe import FeatureCorrelation, choose_weight_decay, fit_logistic
from terabrain.analysis.single_layer import (
    Encoding, ThreadBuffers, WhitenedPatches, affine_form, extract, random_unit_filters,
    resolved_precision, sample_whitened_patches,
)
from terabrain.data.embedded import to_grey
from terabrain.errors import ConfigError
from terabrain.files import write_text_atomically
from terabrain.learners.registry import learner_of
from terabrain.nn.kmeans import triangle

EVALUATION_FILE = "evaluation.json"
FEATURE_SETS = ("learned", "random", "kmeans", "pixels")
LABELLED_FOLDER = "labelled-folder"
PENALTIES = (1e-5, 1e-4, 1e-3, 1e-2)
"""The L2 penalties the validation split chooses from. 1e-5 was added when every feature set
at K = 1,600 chose 1e-4, the smallest of (1e-4, 1e-3, 1e-2)."""
PROBE_ITERATIONS = 20
"""L-BFGS iterations per probe fit. Preconditioned (terabrain.analysis.probe.Preconditioner),
20 iterations end within 0.1 points of 30 and 50 on Fashion-MNIST at K = 1,600 (validation
and test accuracy of the run's own encoder, docs/analysis.md); unpreconditioned, 50 had been
far from the optimum."""


@dataclass
class EvaluateOptions:
    data: str = "fashion-mnist"
    seeds: int = 3
    nonlinearity: str = "relu"
    threshold: float = 0.0
    """The encoding's threshold (terabrain.analysis.single_layer.Encoding)."""
    pool_grid: int = 2
    """Sum pooling over a pool_grid x pool_grid grid of the positions: 2 is the protocol's
    quadrants (4K features); 1 and 3 are there to measure what the choice does."""
    features: tuple[str, ...] = FEATURE_SETS
    weight_decays: tuple[float, ...] = PENALTIES
    validation_fraction: float = 0.2
    probe_iterations: int = PROBE_ITERATIONS
    precision: str = "auto"
    """The matrix products of the extraction's encoder and of the probe: bf16 (float32
    accumulation, float32 weights and sums), fp32, or auto (bf16 where the CPU multiplies
    bfloat16 in hardware: single_layer.resolved_precision)."""
    kmeans_patches: int = 50000
    kmeans_steps: int = 300
    kmeans_batch: int = 1000
    max_examples: Optional[int] = None
    score_test: bool = True
    """False: choose and report on the training split's validation part only, never touching
    the test split (for sweeps that compare settings)."""
    root: Optional[Path] = None
    """With data labelled-folder: the folder of class sub-folders."""
    image_size: int = 32
    """With data labelled-folder: images are resized to this side."""
    work_dir: Optional[Path] = None
    """Where the float16 feature maps go (default RUN/evaluation-features, removed after)."""
    log: Callable[[str], None] = field(default=print)


@dataclass
class Images:
    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray


def patch_pipeline(run: LoadedRun) -> WhitenedPatches:
    """The run's per-patch preprocessing as a convolution; the run must have learned on grey
    square patches without LCN (the protocol's patches)."""
    if len(run.shape) != 2 or run.shape[0] != run.shape[1]:
        raise ConfigError(f"evaluate needs a run trained on grey square patches; "
                          f"{run.run_dir} has examples of shape {run.shape}")
    if run.config.data.lcn is not None:
        raise ConfigError("evaluate: data.lcn runs are not supported (LCN of a patch is not "
                          "a linear map, so it is not part of the convolution)")
    return WhitenedPatches(run.shape[0], run.config.data.remove_mean, run.whitening)


def load_labelled_folder(root: Path, side: int, seed: int = 0):
    """``root/<class>/<image>``: every image grey, resized to side x side; a seeded 75/25
    train/test split (the classes are the sub-folders, sorted by name)."""
    from PIL import Image

    from terabrain.analysis.datasets import AnalysisData, Split
    from terabrain.data.decode import IMAGE_EXTENSIONS

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ConfigError(f"--root {root}: expected a folder with one sub-folder of images per "
                          "class (at least two)")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                with Image.open(path) as image:
                    grey = image.convert("L").resize((side, side), Image.BILINEAR)
                images.append(np.asarray(grey, np.float32) / 255.0)
                labels.append(label)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(len(images) * 0.75)
    images, labels = np.stack(images), np.asarray(labels, np.int64)
    return AnalysisData("labelled-folder", Split(images[order[:cut]], labels[order[:cut]]),
                        Split(images[order[cut:]], labels[order[cut:]]), classes)


def load_images(name: str, max_examples: Optional[int], root: Optional[Path] = None,
                side: int = 32) -> Images:
    if name == LABELLED_FOLDER:
        if root is None:
            raise ConfigError("--data labelled-folder needs --root DIR (one sub-folder per class)")
        data = load_labelled_folder(root, side)
    else:
        data = load_analysis_data(name, None, max_examples, seed=0)
    if data.preprocessed or data.train.labels is None:
        raise ConfigError(f"--data {name}: evaluate needs labelled images")
    train, test = (to_grey(np.asarray(s.images, np.float32), 3) for s in (data.train, data.test))
    return Images(train, np.asarray(data.train.labels), test, np.asarray(data.test.labels))


def train_kmeans(images: np.ndarray, patches: WhitenedPatches, k: int, seed: int,
                 options: EvaluateOptions) -> torch.nn.Module:
    """The k-means learner (model.kind kmeans) on whitened patches of the training images,
    trained by the common loop with its own step."""
    from terabrain.learners.kmeans import KMeansObjective, MiniBatchKMeansStep
    from terabrain.nn.kmeans import KMeans
    from terabrain.config.sections import TrainConfig
    from terabrain.train.stage import build_trainer

    rows = sample_whitened_patches(images, patches, options.kmeans_patches, seed)
    model = KMeans(patches.dims, k, seed=seed)
    trainer = build_trainer(
        model, KMeansObjective(), optimizer=MiniBatchKMeansStep([model.centroids, model.counts]),
        train=TrainConfig(steps=options.kmeans_steps,
                          batch_size=min(options.kmeans_batch, len(rows))),
        seed=seed, inputs=rows)
    trainer.fit()
    return model.eval()


@dataclass
class Penalty:
    """The L2 penalty chosen for one feature set on the training split's validation part
    (seed 0's features and split), every penalty's validation accuracy, the probe fitted
    there and the features' correlation (the refit's preconditioner)."""
    weight_decay: float
    validation: dict[str, float]
    probe: object
    correlation: Optional[FeatureCorrelation]


def choose_penalty(train: np.ndarray, y_train: np.ndarray, classes: int,
                   options: EvaluateOptions) -> Penalty:
    """Every penalty fitted on the training split less a validation part (seeded with 0, the
    same rows for every feature set) and scored there: only training images are seen."""
    choice = choose_weight_decay(
        torch.from_numpy(np.asarray(train)), torch.from_numpy(y_train), classes,
        options.weight_decays, options.validation_fraction, 0, options.probe_iterations,
        precision=options.precision)
    return Penalty(choice.weight_decay, {str(k): v for k, v in choice.scores.items()},
                   choice.probe, choice.correlation)


def probe_features(train: np.ndarray, y_train: np.ndarray, test: np.ndarray,
                   y_test: np.ndarray, penalty: Penalty, options: EvaluateOptions) -> dict:
    """Refit with the penalty chosen on these features' validation part, on the whole
    training split, starting from the chosen penalty's fit there and preconditioned by the
    same correlation; then score the test split once."""
    classes = penalty.probe.weight.shape[0]
    probe = fit_logistic(torch.from_numpy(np.asarray(train)), torch.from_numpy(y_train),
                         classes, penalty.weight_decay, options.probe_iterations,
                         start=penalty.probe, precision=options.precision,
                         correlation=penalty.correlation)
    test_accuracy = probe.accuracy(torch.from_numpy(np.asarray(test)), torch.from_numpy(y_test))
    return {"weight_decay": penalty.weight_decay, "test_accuracy": test_accuracy,
            "iterations": probe.iterations, "final_gradient": probe.gradient}


DRAWN = ("random", "kmeans")
"""Feature sets whose filters a seed draws: the only ones that differ between seeds."""
LINEAR_CODES = ("learned", "random")
"""Feature sets whose codes get the extraction encoding (k-means has its triangle)."""


def _row(features: str, k: int, dims: int, runs: list[dict], penalty: Penalty,
         seconds: float) -> dict:
    accuracies = np.array([r["test_accuracy"] for r in runs if r["test_accuracy"] is not None])
    return {
        "features": features, "k": k, "feature_count": dims,
        "accuracy_mean": float(accuracies.mean()) if len(accuracies) else None,
        "accuracy_std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
        "weight_decay": penalty.weight_decay, "validation": penalty.validation,
        "seeds": runs, "seconds": seconds,
    }


def evaluate(run_dir: Path, options: EvaluateOptions) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    options = replace(options, precision=resolved_precision(options.precision))
    run = load_run(run_dir)
    patches = patch_pipeline(run)
    k = learner_of(run.config).feature_width(run.config, run.model)
    encoding = Encoding(options.nonlinearity, options.threshold)
    images = load_images(options.data, options.max_examples, options.root, options.image_size)
    classes = int(max(images.train_labels.max(), images.test_labels.max())) + 1
    work = Path(options.work_dir or run.run_dir / "evaluation-features")
    work.mkdir(parents=True, exist_ok=True)
    log = options.log
    log(f"evaluate {run.run_dir} on {options.data}: {len(images.train)} train, "
        f"{len(images.test)} test images, {patches.side}x{patches.side} patches, K={k}, "
        f"{options.seeds} seeds")

    def encoder(name: str, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if name == "learned":
            form = affine_form(run.model.encode, patches.dims)
            if form is not None:  # RICA: one product per position
                # Each filter scaled to unit norm, as the random filters are, so that a
                # threshold means the same for both (RICA's alpha is one shared scale; the
                # standardisation before the probe removes any per-feature scale).
                matrix, offset = form
                norms = matrix.norm(dim=0).clamp_min(1e-12)
                return encoding.affine(matrix / norms, offset / norms)
            return lambda rows: encoding(run.model.encode(rows))
        if name == "random":
            filters = random_unit_filters(k, patches.dims, seed)
            return encoding.affine(filters.T.contiguous(), torch.zeros(k))
        centroids = train_kmeans(images.train, patches, k, seed, options).centroids.detach()
        buffers = ThreadBuffers()
        # The triangle, non-negative already, into this thread's reused float32 buffer.
        return lambda rows: triangle(rows, centroids,
                                     out=buffers.get(rows.shape[0], k, torch.float32))

    runs: dict[str, list[dict]] = {name: [] for name in options.features}
    penalties: dict[str, Penalty] = {}
    seconds = dict.fromkeys(options.features, 0.0)
    pixel_dims = int(np.prod(images.train.shape[1:]))
    grid_cells = options.pool_grid * options.pool_grid
    widths = {name: pixel_dims if name == "pixels" else
              grid_cells * k * (encoding.outputs_per_filter if name in LINEAR_CODES else 1)
              for name in options.features}
    splits = (images.train, "train"), (images.test, "test")
    try:
        for name in options.features:
            # The run's encoder and the pixels are the same for every seed, and so is the
            # probe (the penalty is chosen once, the fit is deterministic): one fit. A seed
            # draws the random filters and k-means' initial centroids and patches.
            seeds = options.seeds if name in DRAWN and options.score_test else 1
            for seed in range(seeds):
                begin = time.perf_counter()
                if name == "pixels":
                    train, test = (a.reshape(len(a), -1) for a in (images.train, images.test))
                else:
                    encode = encoder(name, seed)
                    train, test = (extract(split, patches, encode, widths[name] // grid_cells,
                                           work / f"{name}-{part}.npy", precision=options.precision,
                                           cells=options.pool_grid)
                                   if options.score_test or part == "train" else None
                                   for split, part in splits)
                extracted = time.perf_counter()
                # Each seed's features get their own penalty choice on the validation part
                # (the same rows for every seed): its chosen fit is the refit's warm start,
                # which a fit on another seed's filters is not.
                penalty = choose_penalty(train, images.train_labels, classes, options)
                penalties.setdefault(name, replace(penalty, probe=None, correlation=None))
                chosen = time.perf_counter()
                if options.score_test:
                    result = probe_features(train, images.train_labels, test, images.test_labels,
                                            penalty, options)
                else:
                    result = {"weight_decay": penalty.weight_decay, "test_accuracy": None}
                result["validation"] = penalty.validation[str(penalty.weight_decay)]
                result.update(seed=seed, extract_s=extracted - begin, choose_s=chosen - extracted,
                              refit_s=time.perf_counter() - chosen)
                del train, test
                runs[name].append(result)
                seconds[name] += time.perf_counter() - begin
                validation = result["validation"]
                tested = ("test not scored" if result["test_accuracy"] is None else
                          f"test {100 * result['test_accuracy']:.2f}%")
                log(f"  {name:<8} seed {seed}: {tested} (L2 {result['weight_decay']:g}, "
                    f"validation {100 * validation:.2f}%; extract {result['extract_s']:.0f} s, "
                    f"choose {result['choose_s']:.0f} s, refit {result['refit_s']:.0f} s)")
    finally:
        if options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [_row(name, k, widths[name], runs[name], penalties[name], seconds[name])
            for name in options.features]
    summary = {
        "data": options.data, "train_examples": len(images.train),
        "test_examples": len(images.test), "patch_size": patches.side, "k": k,
        "nonlinearity": options.nonlinearity, "threshold": options.threshold,
        "pool_grid": options.pool_grid, "seeds": options.seeds, "score_test": options.score_test,
        "precision": options.precision,
        "weight_decays": list(options.weight_decays),
        "validation_fraction": options.validation_fraction,
        "probe_iterations": options.probe_iterations,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }
    write_text_atomically(run.run_dir / EVALUATION_FILE, json.dumps(
        [dict(row, protocol=summary) for row in rows], indent=2) + "\n")
    return {"rows": rows, **summary}


def read_evaluation(run_dir: Path) -> Optional[list[dict]]:
    """The rows of RUN/evaluation.json, or None when the run was never evaluated."""
    path = Path(run_dir) / EVALUATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None
