"""Photographs without preprocessing are held as their uint8 pixels and made float32 per
batch (terabrain.data.eight_bit): the same examples, bit for bit, and the same training."""

from __future__ import annotations

import numpy as np
import torch

from terabrain.config.loader import validate
from terabrain.data.eight_bit import unit_float
from terabrain.data.embedded import load_photo
from terabrain.data.patches import sample_patches
from terabrain.data.prepare import prepare_data
from terabrain.data.sources import source_of
from terabrain.train.stage import feature_trainer


def _config(**data):
    return validate({
        "name": "eight-bit", "seed": 3, "device": "cpu",
        "data": {"source": "photos", "photos": ["astronaut", "camera", "coffee"], "color": True,
                 "patch_size": 8, "num_patches": 96, "holdout_patches": 16,
                 "remove_mean": False, "whitening": "none", **data},
        "model": {"kind": "autoencoder", "hidden": 16, "tied": True},
        "objective": {"kind": "reconstruction"},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"steps": 6, "batch_size": 16, "log_every": 1, "checkpoint_every": 0,
                  "histogram_every": 0, "progress": False},
    })


def test_unpreprocessed_photographs_are_held_as_uint8_and_equal_the_float_path():
    config = _config()
    prepared = prepare_data(config.data, config.seed)
    assert prepared.train_x.dtype == torch.uint8
    assert prepared.holdout_x.dtype == torch.float32
    # The float path: every photograph divided by 255 first, patches from the same draws.
    rng = np.random.default_rng(config.seed)
    floats = [load_photo(name, color=True) for name in config.data.photos]
    patches = sample_patches(floats, 8, 96 + 16, rng)
    assert patches.dtype == np.float32
    assert np.array_equal(unit_float(prepared.train_x).numpy().view(np.uint32), patches[:96].view(np.uint32))
    assert np.array_equal(prepared.holdout_x.numpy().view(np.uint32), patches[96:].view(np.uint32))


def test_preprocessing_needs_floats():
    config = _config(remove_mean=True)
    assert prepare_data(config.data, config.seed).train_x.dtype == torch.float32
    # a grey photograph in colour mode is repeated, so it stays 8-bit; in grey mode colour
    # photographs are mixed down (arithmetic), and the set is float
    grey = _config(color=False)
    assert prepare_data(grey.data, grey.seed).train_x.dtype == torch.float32


def test_training_on_uint8_pixels_equals_training_on_floats():
    config = _config()
    prepared = prepare_data(config.data, config.seed)
    weights = []
    for inputs in (prepared.train_x, unit_float(prepared.train_x)):
        stage = feature_trainer(config, prepared.example_shape, inputs=inputs)
        stage.trainer.fit()
        weights.append([p.detach().clone() for p in stage.network.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not torch.equal(weights[0][0], feature_trainer(
        config, prepared.example_shape, inputs=prepared.train_x).network.parameters().__next__())


def test_the_planner_counts_one_byte_per_held_pixel():
    held = _config()
    whitened = _config(whitening="zca")
    values = 96 * 8 * 8 * 3
    assert source_of(held.data).resident_bytes(held.data) == values
    assert source_of(whitened.data).resident_bytes(whitened.data) == 4 * values
