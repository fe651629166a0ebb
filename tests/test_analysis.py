"""Analysis building blocks: the concept-neuron threshold search, top-k stimuli, activation
maximization, the linear probe, the face test set, and layer selection."""

import numpy as np
import pytest
import torch

from terabrain.analysis.activations import batched_activations, layer_activations
from terabrain.analysis.concepts import accuracy_grid, best_neuron, concept_row
from terabrain.analysis.maximize import maximize_activation
from terabrain.analysis.probe import train_probe
from terabrain.analysis.topk import NeuronStats, merge_top_k, neuron_stats, rank_slice
from terabrain.errors import ConfigError
from terabrain.nn.autoencoder import RICA, Autoencoder


def planted_network(inputs=30, hidden=12, planted=7, seed=0):
    """A RICA layer whose unit ``planted`` points (negatively) along the direction that
    separates the classes; the others are random directions."""
    generator = torch.Generator().manual_seed(seed)
    model = RICA(inputs, hidden, seed=seed).eval()
    signal = torch.randn(inputs, generator=generator)
    signal /= signal.norm()
    with torch.no_grad():
        model.weight[planted] = -signal  # a '<=' rule: faces drive it negative
    return model, signal


def planted_data(signal, count, positives=0.35, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(count, generator=generator) < positives).long()
    x = torch.randn(count, len(signal), generator=generator) + 2.5 * labels[:, None] * signal
    return x, labels


def test_threshold_search_finds_the_planted_neuron_and_scores_it_on_held_out_data():
    model, signal = planted_network()
    x_select, y_select = planted_data(signal, 400, seed=1)
    x_held, y_held = planted_data(signal, 400, seed=2)
    with torch.no_grad():
        select, held = model.encode(x_select), model.encode(x_held)
    choice = best_neuron(select, y_select, count=100)
    assert choice.neuron == 7 and not choice.above
    assert choice.accuracy(held, y_held) > 0.85
    # Le et al.'s one-sided rule cannot use a unit that goes negative for the concept.
    assert best_neuron(select, y_select, both_polarities=False).selection_accuracy < choice.selection_accuracy

    random = RICA(30, 12, seed=5).eval()
    with torch.no_grad():
        random_pair = (random.encode(x_select), random.encode(x_held))
    row = concept_row("planted", (y_select, y_held), (select, held), [random_pair],
                      (x_select, x_held))
    assert row.learned_neuron == 7
    assert row.learned > row.random_network + 0.1
    assert row.learned > row.guessing + 0.1
    assert abs(row.guessing - float((y_held == 0).float().mean())) < 1e-9
    assert row.linear_filter > 0.85  # the signal is linear: a supervised filter finds it too


def test_accuracy_grid_equals_comparing_every_image_with_every_threshold():
    generator = torch.Generator().manual_seed(3)
    activations = torch.randint(-4, 5, (60, 5), generator=generator).double()  # many ties
    labels = torch.rand(60, generator=generator) < 0.4
    thresholds = torch.linspace(-5, 5, 21).double().expand(5, -1)
    brute = ((activations[:, :, None] > thresholds[None]) == labels[:, None, None]).double().mean(0)
    assert torch.allclose(accuracy_grid(activations, labels, thresholds), brute)


def test_neuron_stats_returns_the_true_top_k_with_ties_in_index_order():
    generator = torch.Generator().manual_seed(4)
    model = RICA(16, 6, seed=2).eval()
    x = torch.randn(97, 16, generator=generator)
    x[50] = x[10]  # exact ties: the lower index must come first
    x[80] = x[10]
    stats = neuron_stats(model, x, k=4, batch_size=7)  # many batches: the merge is exercised
    with torch.no_grad():
        activations = model.encode(x).double()
    for unit in range(6):
        order = sorted(range(len(x)), key=lambda i: (-activations[i, unit].item(), i))[:4]
        assert stats.top_indices[unit].tolist() == order
        assert torch.allclose(stats.top_values[unit], activations[order, unit])
    assert torch.allclose(stats.mean(), activations.mean(0))
    assert torch.allclose(stats.std(), activations.std(0, unbiased=False))
    assert stats.count == 97


def test_top_k_keeps_padding_last_when_fewer_examples_than_k():
    stats = NeuronStats.empty(2, 5)
    stats.update(torch.tensor([[1.0, 3.0], [2.0, 0.0]]), first_index=10)
    assert stats.top_indices.tolist() == [[11, 10, -1, -1, -1], [10, 11, -1, -1, -1]]
    values, indices = merge_top_k(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[9, 4, 7]]), 2)
    assert indices.tolist() == [[7, 4]] and values.tolist() == [[2.0, 1.0]]


def test_rank_slices_cover_every_example_once():
    for count in (0, 1, 7, 100):
        for world in (1, 2, 3, 4):
            covered = [i for r in range(world) for i in range(count)[rank_slice(count, r, world)]]
            assert covered == list(range(count))


def test_activation_maximization_finds_rica_analytic_optimum_on_the_sphere():
    model = RICA(25, 8, seed=1).eval()
    with torch.no_grad():
        model.alpha.fill_(0.7)
    neurons = [0, 3, 5]
    stimuli, start, final = maximize_activation(model, neurons, 25, norm=2.0, steps=150)
    assert torch.allclose(stimuli.norm(dim=1), torch.full((3,), 2.0), atol=1e-5)
    assert (final > start).all()
    analytic = 2.0 * model.filters()[neurons]  # norm * w / ||w||; the maximum is 0.7 * 2
    cosine = torch.nn.functional.cosine_similarity(stimuli, analytic, dim=1)
    assert (cosine > 0.999).all(), cosine
    assert torch.allclose(final, torch.full((3,), 1.4), atol=2e-3)
    # Minimizing gives the opposite direction.
    low, _, lowest = maximize_activation(model, [3], 25, norm=2.0, minimize=[True])
    assert torch.nn.functional.cosine_similarity(low, -analytic[1:2]).item() > 0.999
    assert lowest.item() < -1.39


def test_activation_maximization_increases_a_nonlinear_unit_and_keeps_each_norm():
    model = Autoencoder(36, 10, activation="sigmoid", seed=3).eval()
    norms = torch.tensor([0.5, 1.0, 3.0])
    stimuli, start, final = maximize_activation(model, [1, 2, 9], 36, norm=norms, steps=100)
    assert torch.allclose(stimuli.norm(dim=1), norms, atol=1e-5)
    assert (final > start + 0.05).all()
    with torch.no_grad():
        again = model.encode(stimuli)[[0, 1, 2], [1, 2, 9]]
    assert torch.allclose(again, final)


def test_probe_separates_separable_classes_and_not_noise():
    generator = torch.Generator().manual_seed(6)
    centres = torch.randn(3, 20, generator=generator) * 3
    y = torch.randint(0, 3, (600,), generator=generator)
    x = centres[y] + torch.randn(600, 20, generator=generator)
    probe = train_probe(x[:400], y[:400])
    assert probe.accuracy(x[400:], y[400:]) > 0.95
    noise = torch.randn(600, 20, generator=generator)
    assert train_probe(noise[:400], y[:400]).accuracy(noise[400:], y[400:]) < 0.5


class TwoLayers(torch.nn.Module):
    """The interface stacked models expose: ``num_layers`` and ``encode(x, layer=N)``."""

    num_layers = 2

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 3)
        self.second = torch.nn.Linear(3, 2)

    def encode(self, x, layer=2):
        h = torch.relu(self.first(x))
        return h if layer == 1 else self.second(h)


def test_layer_activations_selects_the_layer_and_rejects_missing_ones():
    model = TwoLayers()
    x = torch.randn(5, 4)
    assert layer_activations(model, x, 1).shape == (5, 3)
    assert batched_activations(model, x, 2, batch_size=2).shape == (5, 2)
    with pytest.raises(ConfigError, match="allowed: 1..2"):
        layer_activations(model, x, 3)
    with pytest.raises(ConfigError, match="1 layer"):
        layer_activations(RICA(4, 3, seed=0), x, 2)


def test_face_test_set_is_35_percent_faces_and_training_never_sees_held_out_faces():
    from terabrain.data.faces import face_mix, face_test_set, training_faces

    splits = face_test_set()
    for images, labels in splits.values():
        assert images.shape == (143, 25, 25) and 0 <= images.min() and images.max() <= 1
        assert abs(labels.mean() - 0.35) < 0.01
    held_faces = splits["heldout"][0][splits["heldout"][1] == 1].reshape(50, -1)
    train_faces = training_faces().reshape(50, -1)
    distances = ((held_faces[:, None] - train_faces[None]) ** 2).sum(-1)
    assert distances.min() > 1e-3  # no held-out face among the training faces
    mix = face_mix(200, 16, 0.35, np.random.default_rng(0))
    assert mix.shape == (200, 256) and np.isfinite(mix).all()


def test_new_images_reach_a_colour_model_as_its_training_data_did():
    from terabrain.analysis.filters import filter_grid
    from terabrain.analysis.loaded_run import LoadedRun, example_shape
    from terabrain.config.loader import load_experiment
    from terabrain.data.patches import remove_patch_mean
    from terabrain.data.whitening import ZCA
    from terabrain.learners.registry import build_model

    config = load_experiment("lbann-ae-small", ["model.hidden=8", "data.remove_mean=true",
                                                "data.patch_size=8"])
    shape = example_shape(config)
    assert shape == (8, 8, 3)
    rng = np.random.default_rng(0)
    whitening = ZCA.fit(remove_patch_mean(rng.random((400, 192), np.float32), 3), 0.1)
    run = LoadedRun(None, config, build_model(config.model, 192, seed=0), whitening, shape)
    grey = rng.random((5, 8, 8)).astype(np.float32)
    rows = run.to_model_input(grey)
    colour = np.repeat(grey[..., None], 3, axis=3).reshape(5, -1)
    expected = whitening.apply(remove_patch_mean(colour, 3))
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert run.to_model_input(rng.random((2, 64, 64, 3))).shape == (2, 192)  # resized
    grid = filter_grid(run.model.filters(), shape)
    assert (grid[..., 0] != grid[..., 1]).any()  # drawn in colour


def test_face_mix_source_prepares_whitened_grey_images_deterministically():
    from terabrain.config.loader import load_experiment
    from terabrain.data.prepare import prepare_data

    config = load_experiment("faces-rica", ["data.num_patches=300", "data.holdout_patches=50",
                                            "data.whitening_fit_samples=300"])
    first, again = prepare_data(config.data, 0), prepare_data(config.data, 0)
    assert first.train_x.shape == (300, 256) and first.holdout_x.shape == (50, 256)
    assert first.example_shape == (16, 16) and first.whitening is not None
    assert torch.equal(first.train_x, again.train_x)
    assert not torch.equal(first.train_x, prepare_data(config.data, 1).train_x)


def test_inner_selection_accuracy_is_not_inflated_by_many_neurons_but_finds_a_real_one():
    from terabrain.analysis.concepts import best_neuron
    from terabrain.analysis.selection import inner_accuracy, stratified_halves

    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(140) % 20 < 7).long()  # 35% positives, like the face test
    first, second = stratified_halves(labels, generator)
    assert set(first.tolist()).isdisjoint(second.tolist()) and len(first) + len(second) == 140
    assert labels[first].sum() == labels[second].sum() - 1  # 49 positives: 24 and 25
    noise = torch.randn(140, 400, generator=generator)  # no neuron knows the labels
    chosen = best_neuron(noise, labels).selection_accuracy
    honest = inner_accuracy(noise, labels, cuts=10)
    assert chosen > 0.70  # the maximum over 400 noise neurons looks good on its own images
    assert honest < 0.66 < chosen - 0.04  # chosen on one half, scored on the other: at most
    # guessing (65%; a noise neuron's threshold is often worse than guessing on new images)
    planted = noise.clone()
    planted[:, 17] = labels.double() + 0.3 * torch.randn(140, generator=generator)
    assert inner_accuracy(planted, labels, cuts=10) > 0.9
