"""What a run leaves for people: TensorBoard events, docs in step with the code, bf16."""

import json
from pathlib import Path

from terabrain.config.loader import load_experiment
from terabrain.config.reference import markdown
from terabrain.train.run import run_experiment

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "data.num_patches=2000", "data.holdout_patches=500", "data.whitening_fit_samples=2000",
    "model.hidden=16", "optimizer.max_iter=5", "train.steps=4", "train.checkpoint_every=0",
    "train.histogram_every=2", "train.progress=false",
]


def test_tensorboard_has_scalars_histograms_and_filter_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_experiment(load_experiment(None, SMALL), tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"features/loss", "features/sparsity", "features/reconstruction"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("features/loss")] == [
        json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert "features/weight" in tags["histograms"]
    assert [e.step for e in events.Histograms("features/weight")] == [2, 4]
    assert "features/filters" in tags["images"]


def test_bf16_autocast_trains(tmp_path):
    results = run_experiment(
        # SMALL's L-BFGS max_iter would be refused beside optimizer.name=adam (it does not apply).
        load_experiment(None, [o for o in SMALL if not o.startswith("optimizer.max_iter")]
                        + ["precision=bf16", "optimizer.name=adam",
                                       "optimizer.lr=0.01", "train.batch_size=256",
                                       "train.steps=30"]),
        tmp_path,
    )
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    assert results["features"]["steps"] == 30


def test_config_reference_is_current():
    assert (REPO / "docs/config.md").read_text() == markdown(), (
        "docs/config.md is stale: run `python -m terabrain.config.reference > docs/config.md`"
    )


def test_flat_npy_examples_get_pictures_and_statistics(tmp_path):
    import numpy as np

    from terabrain.config.loader import load_experiment
    from terabrain.train.run import run_experiment

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((120, 10), dtype=np.float32))
    config = load_experiment(None, [
        "data.source=npy", f"data.path={tmp_path / 'x.npy'}", "data.whitening=none",
        "model.hidden=4", "train.steps=2", "train.progress=false",
    ])
    results = run_experiment(config, tmp_path / "run")
    assert (tmp_path / "run" / "filters.png").exists()
    assert results["features"]["filters"]["spatial_spread_px"] > 0


def test_long_flat_rows_get_a_strip_picture_streamed_or_not(tmp_path):
    """A flat row longer than a picture cell (3,072 values: not a square, so a 1 x 3,072
    strip) is shrunk along its length only; it crashed at the end of a run, streamed or not."""
    import numpy as np
    import torch

    from terabrain.analysis.filters import MAX_CELL_PX, filter_grid

    grid = filter_grid(torch.randn(4, 3072), (3072,))
    assert grid.shape[1] == 2 * (MAX_CELL_PX + 1) + 1 and grid.shape[0] > 2
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((200, 3072), dtype=np.float32))
    for stream in ("false", "true"):
        config = load_experiment(None, [
            "data.source=npy", f"data.path={tmp_path / 'x.npy'}", "data.whitening=none",
            f"data.stream={stream}", "model.hidden=4", "train.steps=2", "train.batch_size=40",
            "train.progress=false",
        ])
        run_experiment(config, tmp_path / f"run-{stream}")
        assert (tmp_path / f"run-{stream}" / "filters.png").exists()
