"""The analysis commands behind the CLI: `terabrain analyze`, `features` and `probe`.

`analyze` and `features` run on one process or under torchrun / srun / mpirun, where each
rank takes a slice of the examples (gloo: analysis tensors live on the CPU).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from terabrain.errors import ConfigError

# torch and numpy are imported inside the commands: building the CLI parser stays cheap.


@contextmanager
def _ranks():
    """Join the launcher's process group, if any; yields whether this is rank 0."""
    from terabrain.parallel import detect_launch_env, fail_fast, init_distributed, shutdown_distributed

    env = detect_launch_env()
    with fail_fast(env):
        init_distributed(env, "gloo")
        yield env.rank == 0
        shutdown_distributed()


def analyze_command(args: argparse.Namespace) -> int:
    from terabrain.analysis.report import CONCEPT_SETS, AnalyzeOptions, analyze

    concepts = () if args.concepts == "none" else tuple(args.concepts.split(","))
    unknown = [name for name in concepts if name not in CONCEPT_SETS]
    if unknown:
        raise ConfigError(f"--concepts {','.join(unknown)}; allowed: "
                          f"{','.join(CONCEPT_SETS)} or none")
    for name in ("top_k", "neurons", "thresholds", "max_examples", "maximize_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    options = AnalyzeOptions(
        layer=args.layer, data=args.data, split=args.split, top_k=args.top_k,
        neurons=args.neurons, concepts=concepts, thresholds=args.thresholds,
        random_networks=args.random_networks, max_examples=args.max_examples,
        maximize_steps=args.maximize_steps, seed=args.seed)
    with _ranks() as main:
        summary = analyze(args.run_dir, options, args.command_line)
    if main:
        out = args.run_dir / "analysis"
        for row in summary["concepts"]:
            print(f"{row['concept']:<28} learned {100 * row['learned']:5.1f}%  random "
                  f"{100 * row['random_network']:5.1f}%  pixel {100 * row['best_pixel']:5.1f}%  "
                  f"guessing {100 * row['guessing']:5.1f}%")
        print(f"report: {out / 'report.html'} (and report.md, analysis.json); "
              f"{summary['seconds']:.1f} s")
    return 0


def features_command(args: argparse.Namespace) -> int:
    import numpy as np

    from terabrain.analysis.datasets import load_analysis_data
    from terabrain.analysis.features import model_rows, write_features
    from terabrain.analysis.loaded_run import load_run

    run = load_run(args.run_dir)
    model = run.model if args.random_seed is None else run.random_model(args.random_seed)
    data = load_analysis_data(args.data, run, args.max_examples, args.seed)
    rows = model_rows(run, data, args.split)
    with _ranks() as main:
        shape = write_features(model, rows, args.out, args.layer)
        labels = data.split(args.split).labels
        labels_path = args.out.with_name(args.out.stem + ".labels.npy")
        if main and labels is not None:
            np.save(labels_path, labels)
    if main:
        print(f"{args.out}: {shape[0]} x {shape[1]} float32 (layer {args.layer}, "
              f"{args.data} {args.split})" + (f"; labels in {labels_path}" if labels is not None else ""))
    return 0


def probe_command(args: argparse.Namespace) -> int:
    import torch

    from terabrain.analysis.activations import batched_activations, check_layer
    from terabrain.analysis.datasets import load_analysis_data
    from terabrain.analysis.features import model_rows
    from terabrain.analysis.loaded_run import load_run
    from terabrain.analysis.probe import train_probe

    torch.manual_seed(args.seed)
    run = load_run(args.run_dir)
    check_layer(run.model, args.layer)
    data = load_analysis_data(args.data, run, args.max_examples, args.seed)
    if data.train.labels is None:
        raise ConfigError(f"--data {args.data} has no labels to probe")
    y_train, y_test = (torch.as_tensor(s.labels) for s in (data.train, data.test))
    inputs = [model_rows(run, data, "train"), model_rows(run, data, "test")]
    random = run.random_model(run.config.seed + 1000)
    representations = {
        "learned network": [batched_activations(run.model, x, args.layer) for x in inputs],
        "random network": [batched_activations(random, x, args.layer) for x in inputs],
        "model input (pixels as the network sees them)": inputs,
    }
    if not data.preprocessed:
        representations["raw pixels (native size)"] = [
            torch.from_numpy(s.images.reshape(len(s.images), -1)) for s in (data.train, data.test)]
    results = {}
    for name, (train, test) in representations.items():
        probe = train_probe(train, y_train, classes=int(max(y_train.max(), y_test.max())) + 1,
                            seed=args.seed)
        results[name] = {"dims": train.shape[1], "test_accuracy": probe.accuracy(test, y_test),
                         "train_accuracy": probe.accuracy(train, y_train),
                         "weight_decay": probe.weight_decay}
    print(f"linear probe on {args.data} (layer {args.layer}): {len(y_train)} train, "
          f"{len(y_test)} test examples")
    for name, result in results.items():
        print(f"  {name:<46} {result['dims']:>5} dims  test {100 * result['test_accuracy']:5.1f}%  "
              f"(train {100 * result['train_accuracy']:5.1f}%, L2 {result['weight_decay']:g})")
    if args.out is not None:
        args.out.write_text(json.dumps({"data": args.data, "layer": args.layer,
                                        "train_examples": len(y_train),
                                        "test_examples": len(y_test), "results": results},
                                       indent=2) + "\n")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from terabrain.analysis.evaluate import FEATURE_SETS, EvaluateOptions, evaluate
    from terabrain.analysis.single_layer import NONLINEARITIES, PRECISIONS

    features = tuple(args.features.split(","))
    unknown = [name for name in features if name not in FEATURE_SETS]
    if unknown:
        raise ConfigError(f"--features {','.join(unknown)}; allowed: {','.join(FEATURE_SETS)}")
    if args.nonlinearity not in NONLINEARITIES:
        raise ConfigError(f"--nonlinearity {args.nonlinearity}; allowed: {', '.join(NONLINEARITIES)}")
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision {args.precision}; allowed: {', '.join(PRECISIONS)}")
    for name in ("seeds", "kmeans_steps", "probe_iterations", "pool_grid"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        decays = tuple(float(v) for v in args.weight_decays.split(","))
    except ValueError:
        raise ConfigError(f"--weight-decays {args.weight_decays}: expected numbers separated "
                          "by commas") from None
    options = EvaluateOptions(
        data=args.data, seeds=args.seeds, nonlinearity=args.nonlinearity, features=features,
        weight_decays=decays, probe_iterations=args.probe_iterations,
        kmeans_steps=args.kmeans_steps, max_examples=args.max_examples, root=args.root,
        image_size=args.image_size, precision=args.precision, threshold=args.threshold,
        pool_grid=args.pool_grid, score_test=not args.validation_only)
    summary = evaluate(args.run_dir, options)
    print(f"{'features':<8} {'K':>5} {'dims':>6}  {'L2':>6}  validation  test accuracy "
          f"(mean ± std over the seeds that draw filters: {options.seeds})")
    for row in summary["rows"]:
        print(f"{row['features']:<8} {row['k']:>5} {row['feature_count']:>6}  "
              f"{row['weight_decay']:>6g}  {100 * row['validation'][str(row['weight_decay'])]:9.2f}%  "
              + (f"{100 * row['accuracy_mean']:.2f}% ± {100 * row['accuracy_std']:.2f} "
                 f"({len(row['seeds'])} fit{'s' if len(row['seeds']) > 1 else ''})"
                 if row["accuracy_mean"] is not None else "not scored (--validation-only)"))
    print(f"{args.run_dir / 'evaluation.json'}; {summary['seconds']:.0f} s wall, "
          f"{summary['cpu_seconds']:.0f} s CPU")
    return 0


def add_parsers(commands) -> None:
    """Register analyze, features and probe on the CLI's sub-parsers."""
    from terabrain.analysis.datasets import DATA_SETS

    analyze = commands.add_parser(
        "analyze", help="report what a run learned: filters, top stimuli, concept neurons",
        description="Writes RUN_DIR/analysis/report.html, report.md, analysis.json and PNGs.")
    analyze.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    analyze.add_argument("--layer", type=int, default=1, help="layer to analyse (default 1)")
    analyze.add_argument("--data", choices=DATA_SETS,
                         help="data set for top stimuli (default: faces for a face_mix run, "
                         "else the run's own held-out examples)")
    analyze.add_argument("--split", default="test", choices=("train", "test"))
    analyze.add_argument("--top-k", type=int, default=5, help="stimuli per neuron (default 5)")
    analyze.add_argument("--neurons", type=int, default=8,
                         help="most selective neurons shown (default 8)")
    analyze.add_argument("--concepts", default="faces,fashion-mnist",
                         help="concept tests: faces,fashion-mnist (default) or none")
    analyze.add_argument("--thresholds", type=int, default=100,
                         help="evenly spaced thresholds per neuron (default 100)")
    analyze.add_argument("--random-networks", type=int, default=3,
                         help="random-weight networks averaged as a baseline (default 3)")
    analyze.add_argument("--max-examples", type=int, default=10000,
                         help="cap on examples per split (default 10000)")
    analyze.add_argument("--maximize-steps", type=int, default=200,
                         help="gradient steps of activation maximization (default 200)")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.set_defaults(handler=analyze_command)

    features = commands.add_parser(
        "features", help="write a layer's features of a data set to .npy",
        description="terabrain features RUN_DIR --data fashion-mnist --layer 1 --out f.npy")
    features.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    features.add_argument("--data", required=True, choices=DATA_SETS)
    features.add_argument("--split", default="test", choices=("train", "test"))
    features.add_argument("--layer", type=int, default=1)
    features.add_argument("--out", type=Path, required=True, help="the .npy file to write "
                          "(labels, if any, go to NAME.labels.npy beside it)")
    features.add_argument("--max-examples", type=int, default=None)
    features.add_argument("--random-seed", type=int, default=None,
                          help="features of the same network with random weights instead")
    features.add_argument("--seed", type=int, default=0)
    features.set_defaults(handler=features_command)

    probe = commands.add_parser(
        "probe", help="linear classifier on a layer's features vs pixels and a random network",
        description="terabrain probe RUN_DIR --data fashion-mnist")
    probe.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    probe.add_argument("--data", required=True, choices=DATA_SETS)
    probe.add_argument("--layer", type=int, default=1)
    probe.add_argument("--max-examples", type=int, default=10000,
                       help="cap on examples per split (default 10000)")
    probe.add_argument("--out", type=Path, help="also write the results as JSON here")
    probe.add_argument("--seed", type=int, default=0)
    probe.set_defaults(handler=probe_command)

    evaluate = commands.add_parser(
        "evaluate", help="single-layer protocol (Coates et al. 2011) vs pixels, random "
        "filters and k-means",
        description="Convolutional extraction of the run's first-layer encoder with its patch "
        "preprocessing, quadrant sum-pooling (4K features), L2 logistic probe with the penalty "
        "chosen on a validation part of the training split; writes RUN_DIR/evaluation.json.")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--data", default="fashion-mnist",
                          choices=[d for d in DATA_SETS if d != "holdout"] + ["labelled-folder"])
    evaluate.add_argument("--root", type=Path, help="with --data labelled-folder: a folder "
                          "with one sub-folder of images per class (seeded 75/25 split)")
    evaluate.add_argument("--image-size", type=int, default=32,
                          help="with --data labelled-folder: images resized to this side")
    evaluate.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    evaluate.add_argument("--features", default="learned,random,kmeans,pixels",
                          help="feature sets (default learned,random,kmeans,pixels)")
    evaluate.add_argument("--nonlinearity", default="relu",
                          help="after the encoder at extraction: relu (default), abs, none, "
                          "split (polarity split: max(0, s - t), max(0, -s - t), two maps per "
                          "filter); given to the run's encoder and to the random filters")
    evaluate.add_argument("--threshold", type=float, default=0.0,
                          help="the encoding's threshold t: relu gives max(0, s - t) "
                          "(default 0)")
    evaluate.add_argument("--pool-grid", type=int, default=2,
                          help="sum pooling over an N x N grid of the positions: 2 (default) "
                          "is the protocol's quadrants, 4K features; 1 or 3 to measure the "
                          "choice (K or 9K features)")
    evaluate.add_argument("--validation-only", action="store_true",
                          help="choose and report on the training split's validation part "
                          "only; the test split is not loaded into any fit (for sweeps)")
    evaluate.add_argument("--weight-decays", default="0.00001,0.0001,0.001,0.01",
                          help="L2 penalties the validation split chooses from "
                          "(default 1e-5,1e-4,1e-3,1e-2)")
    evaluate.add_argument("--probe-iterations", type=int, default=20,
                          help="L-BFGS iterations of each probe fit, preconditioned by the "
                          "features' correlation (default 20)")
    evaluate.add_argument("--precision", default="auto",
                          help="the matrix products of the encoder at extraction and of the "
                          "probe: bf16 (float32 sums, weights and loss), fp32, or auto "
                          "(default: bf16 where the CPU has bfloat16 in hardware, else fp32)")
    evaluate.add_argument("--kmeans-steps", type=int, default=300,
                          help="mini-batch k-means steps of 1,000 patches (default 300)")
    evaluate.add_argument("--max-examples", type=int, default=None,
                          help="cap on examples per split (default: all)")
    evaluate.set_defaults(handler=evaluate_command)
