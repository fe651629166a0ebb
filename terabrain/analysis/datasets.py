"""Data sets to analyse a run with, by name, each with a selection/training split and a
held-out split (``--data NAME``):

- ``faces``: the Le et al.-style face test (terabrain.data.faces): lfw_subset faces, its
  non-faces and photo crops, 35% faces; splits ``selection`` / ``heldout``.
- ``fashion-mnist``: Fashion-MNIST's own train / test splits (10 classes).
- ``digits``: scikit-learn's 8x8 digits, a seeded 75/25 split.
- ``holdout``: the run's own held-out examples (already preprocessed; no labels), rebuilt
  from its config exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from terabrain.errors import ConfigError

DATA_SETS = ("faces", "fashion-mnist", "digits", "holdout")


@dataclass
class Split:
    images: np.ndarray
    """(N, H, W[, C]) in [0, 1]; or, when ``preprocessed``, model-input rows (N, D)."""
    labels: Optional[np.ndarray] = None


@dataclass
class AnalysisData:
    name: str
    train: Split
    test: Split
    classes: list[str] = field(default_factory=list)
    preprocessed: bool = False
    description: str = ""

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise ConfigError(f"--split {name!r}; allowed: train, test")
        return self.train if name == "train" else self.test


def _subsample(split: Split, limit: Optional[int], seed: int) -> Split:
    if limit is None or len(split.images) <= limit:
        return split
    rows = np.sort(np.random.default_rng(seed).permutation(len(split.images))[:limit])
    return Split(split.images[rows], None if split.labels is None else split.labels[rows])


def load_analysis_data(name: str, run=None, max_examples: Optional[int] = None,
                       seed: int = 0) -> AnalysisData:
    """``max_examples`` caps each split (a seeded random subset, kept in the original order)."""
    if name == "faces":
        from terabrain.data.faces import face_test_set

        splits = face_test_set()
        data = AnalysisData(name, Split(*splits["selection"]), Split(*splits["heldout"]),
                            ["non-face", "face"],
                            description="lfw_subset faces vs its non-faces and photo crops "
                            "(35% faces); train = selection half, test = held-out half")
    elif name == "fashion-mnist":
        from terabrain.data.labelled import (
            FASHION_MNIST_CLASSES, fashion_mnist_available, load_fashion_mnist,
        )

        if not fashion_mnist_available():
            raise ConfigError("--data fashion-mnist: not installed (apt-get install "
                              "dataset-fashion-mnist, or set TERABRAIN_FASHION_MNIST)")
        data = AnalysisData(name, Split(*load_fashion_mnist("train")),
                            Split(*load_fashion_mnist("test")), list(FASHION_MNIST_CLASSES),
                            description="Fashion-MNIST, its own train and test splits")
    elif name == "digits":
        from terabrain.data.embedded import load_digits

        images, labels = load_digits()
        order = np.random.default_rng(seed).permutation(len(images))
        cut = int(len(images) * 0.75)
        images = images.reshape(-1, 8, 8)
        data = AnalysisData(name, Split(images[order[:cut]], labels[order[:cut]]),
                            Split(images[order[cut:]], labels[order[cut:]]),
                            [str(d) for d in range(10)],
                            description="scikit-learn digits, seeded 75/25 split")
    elif name == "holdout":
        if run is None:
            raise ConfigError("--data holdout needs a run directory")
        from terabrain.data.eight_bit import unit_float
        from terabrain.data.prepare import prepare_data

        prepared = prepare_data(run.config.data, run.config.seed)
        train_y = None if prepared.train_y is None else prepared.train_y.numpy()
        test_y = None if prepared.holdout_y is None else prepared.holdout_y.numpy()
        data = AnalysisData(name, Split(unit_float(prepared.train_x).numpy(), train_y),
                            Split(prepared.holdout_x.numpy(), test_y), preprocessed=True,
                            description="the run's own held-out examples, preprocessed as "
                            "in training (shown whitened, as in Ni et al. 2015 fig. 5)")
    else:
        raise ConfigError(f"--data {name!r}; allowed: {', '.join(DATA_SETS)}")
    data.train = _subsample(data.train, max_examples, seed)
    data.test = _subsample(data.test, max_examples, seed + 1)
    return data
