"""The one-buffer autograd functions (terabrain.nn.shared_weight) against plain autograd:
same values, same gradients (gradcheck in float64, and a comparison with the formula
written with ordinary tensor operations), and the models that use them: the fully
connected autoencoder and RICA, and the deep network's local, conv and dense layers
(terabrain.nn.filter_maps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from terabrain.config.schema import OptimizerConfig, TrainConfig
from terabrain.nn import gradient_buffers
from terabrain.nn.autoencoder import RICA, Autoencoder
from terabrain.nn.filter_maps import ConvMap, DenseMap, LocalMap
from terabrain.nn.local import locally_connected, locally_connected_transpose
from terabrain.nn.shared_weight import (
    tied_pair, unit_row_map_codes, unit_row_map_pair, unit_row_pair,
)
from terabrain.nn.unit_rows import unit_rows
from terabrain.objectives import ReconstructionObjective, RICAObjective
from terabrain.train.stage import build_trainer


def _inputs(rows=5, inputs=7, hidden=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, dtype=torch.float64, generator=generator)
    w = torch.randn(hidden, inputs, dtype=torch.float64, generator=generator) * 0.5
    b = torch.randn(hidden, dtype=torch.float64, generator=generator) * 0.1
    return x, w, b


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "identity"])
def test_tied_pair_passes_gradcheck(activation):
    x, w, b = _inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: tied_pair(*a, activation), (x, w, b))


@pytest.mark.parametrize("use_codes", [True, False])
def test_tied_pair_matches_autograd(use_codes):
    x, w, b = _inputs(rows=8, inputs=11, hidden=6, seed=1)
    target = torch.randn(8, 11, dtype=torch.float64)
    grads = []
    for function in ("ours", "autograd"):
        weight, bias = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        if function == "ours":
            codes, codes_w = tied_pair(x, weight, bias, "sigmoid")
        else:
            codes = torch.sigmoid(x @ weight.T + bias)
            codes_w = codes @ weight
        loss = (codes_w - target).pow(2).sum() + (codes.pow(2).sum() if use_codes else 0)
        loss.backward()
        grads.append((loss.detach(), weight.grad, bias.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference)


def test_unit_row_pair_passes_gradcheck():
    x, w, _ = _inputs()
    alpha = torch.tensor(1.3, dtype=torch.float64)
    for t in (x, w, alpha):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(unit_row_pair, (x, w, alpha))


def test_unit_row_pair_matches_normalised_copy():
    """Off the unit sphere too (rows of any norm), and with a zero row (kept at zero)."""
    x, w, _ = _inputs(rows=9, inputs=10, hidden=5, seed=2)
    w[3] = 0.0
    target = torch.randn(9, 10, dtype=torch.float64)
    results = []
    for function in ("ours", "autograd"):
        weight = w.clone().requires_grad_(True)
        alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        if function == "ours":
            codes, codes_w = unit_row_pair(x, weight, alpha)
        else:
            unit = unit_rows(weight)
            codes = alpha * (x @ unit.T)
            codes_w = codes @ unit
        loss = (codes_w - target).pow(2).sum() + torch.sqrt(codes.pow(2) + 0.01).sum()
        loss.backward()
        results.append((codes.detach(), codes_w.detach(), weight.grad, alpha.grad))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference)
    assert results[0][2][3].abs().max() == 0


def test_models_train_as_with_autograd():
    """The tied autoencoder and RICA give the loss and gradients of their autograd form."""
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    ae = Autoencoder(12, 5, tied=True, seed=3)
    codes, reconstruction = ae(x)
    reference_codes = torch.sigmoid(x @ ae.encoder.weight.T + ae.encoder.bias)
    torch.testing.assert_close(codes, reference_codes)
    torch.testing.assert_close(reconstruction, reference_codes @ ae.encoder.weight + ae.decoder_bias)
    rica = RICA(12, 5, seed=4)
    with torch.no_grad():
        rica.weight.mul_(torch.linspace(0.5, 2.0, 5).unsqueeze(1))  # off the sphere
    codes, reconstruction = rica(x)
    unit = unit_rows(rica.weight)
    torch.testing.assert_close(codes, rica.alpha * x @ unit.T)
    torch.testing.assert_close(reconstruction, codes @ unit + rica.bias)
    torch.testing.assert_close(rica.encode(x), codes)


# --- the weight's gradient written into the last step's memory ---------------------------------

def _train(model, objective, optimizer, monkeypatch, reuse):
    """Train 6 steps: the weight gradient's memory address at every backward pass, how many
    gradients were written into kept memory, the parameters after."""
    if not reuse:  # without the use count nothing is reused: the previous behaviour
        monkeypatch.setattr(gradient_buffers, "_use_count", None)
    weight = model.weights()[0] if hasattr(model, "weights") else model.weight
    addresses = []
    weight.register_post_accumulate_grad_hook(
        lambda p: addresses.append(p.grad.untyped_storage().data_ptr()))
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    trainer = build_trainer(model, objective, optimizer=optimizer,
                            train=TrainConfig(steps=6, batch_size=16, progress=False),
                            seed=0, inputs=x)
    trainer.fit()
    monkeypatch.undo()
    reused = gradient_buffers.buffer_for(weight).reused
    return addresses, reused, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["tied", "rica"])
def test_the_weight_gradient_reuses_its_memory_and_trains_identically(kind, monkeypatch):
    """Every step after the first writes the weight's gradient into the first step's memory
    (no new pages to fault in), and training is bit for bit what new buffers give."""
    def run(reuse):
        if kind == "tied":
            model = Autoencoder(48, 20, tied=True, seed=3)
            optimizer = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)
            return _train(model, ReconstructionObjective(), optimizer, monkeypatch, reuse)
        optimizer = OptimizerConfig(name="lbfgs", lr=1.0, max_iter=3)
        return _train(RICA(48, 20, seed=3), RICAObjective(0.1, 1e-2), optimizer, monkeypatch,
                      reuse)

    reused, reuses, reused_parameters = run(True)
    fresh, no_reuses, fresh_parameters = run(False)
    assert len(reused) >= 6 and len(set(reused)) == 1 and reuses == len(reused) - 1
    assert len(fresh) == len(reused) and no_reuses == 0
    for a, b in zip(reused_parameters, fresh_parameters):
        assert torch.equal(a, b)


def test_a_gradient_still_held_is_never_overwritten():
    """A gradient someone kept (a variable, a view, a pending collective) keeps its values:
    the next backward pass writes elsewhere; and a gradient accumulated over two passes
    (no zero_grad in between) is their sum."""
    ae = Autoencoder(12, 5, tied=True, seed=3)
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    y = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    weight = ae.encoder.weight

    def gradient(inputs):
        weight.grad = None
        ae(inputs)[1].pow(2).sum().backward()
        return weight.grad

    first = gradient(x)
    kept = first.clone()
    view = first[:2]
    second = gradient(y)  # `first` and its view are still referenced
    assert second.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    assert torch.equal(first, kept) and torch.equal(view, kept[:2])
    del first, view
    third = gradient(x)  # nothing holds `first`'s memory now: reused, and correct
    torch.testing.assert_close(third, kept, rtol=0, atol=0)
    ae(y)[1].pow(2).sum().backward()  # accumulated into .grad, which is the kept memory
    torch.testing.assert_close(weight.grad, kept + second)


# --- the deep network's filter maps -------------------------------------------------------------

def _conv_kernel(weight, kernel, channels):
    return weight.view(weight.shape[0], kernel, kernel, channels).permute(0, 3, 1, 2)


# name: (map, input shape, weight shape, the map and its adjoint written with torch's and
# terabrain.nn.local's ordinary autograd operations)
MAPS = {
    "local": (LocalMap(3, 2, (7, 6), block_bytes=1), (2, 2, 7, 6), (3 * 2, 3, 18),
              lambda x, w: locally_connected(x, w, 3, 2, (3, 2), block_bytes=1),
              lambda y, w: locally_connected_transpose(y, w, 3, 2, (7, 6), block_bytes=1)),
    "conv": (ConvMap(3, 2, (2, 8, 7)), (2, 2, 8, 7), (3, 18),
             lambda x, w: F.conv2d(x, _conv_kernel(w, 3, 2), stride=2),
             lambda y, w: F.conv_transpose2d(y, _conv_kernel(w, 3, 2), stride=2,
                                             output_padding=(1, 0))),
    "dense": (DenseMap((2, 3, 2)), (2, 2, 3, 2), (4, 12),
              lambda x, w: F.linear(x.flatten(1), w)[:, :, None, None],
              lambda y, w: (y.flatten(1) @ w).view(-1, 2, 3, 2)),
}


def _map_inputs(name, seed=0, rows=None):
    fmap, x_shape, w_shape, _, _ = MAPS[name]
    generator = torch.Generator().manual_seed(seed)
    x_shape = (rows or x_shape[0], *x_shape[1:])
    x = torch.randn(*x_shape, dtype=torch.float64, generator=generator)
    w = torch.randn(*w_shape, dtype=torch.float64, generator=generator)
    d = torch.randn(*w_shape, dtype=torch.float64, generator=generator)
    return fmap, x, w, d


@pytest.mark.parametrize("name", list(MAPS))
def test_unit_row_map_pair_passes_gradcheck(name):
    """Tied, untied and codes alone, every input differentiated."""
    fmap, x, w, d = _map_inputs(name)
    alpha = torch.tensor(1.3, dtype=torch.float64)
    for t in (x, w, d, alpha):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, a: unit_row_map_pair(fmap, x, w, None, a), (x, w, alpha))
    assert torch.autograd.gradcheck(lambda x, w, d, a: unit_row_map_pair(fmap, x, w, d, a), (x, w, d, alpha))
    assert torch.autograd.gradcheck(lambda x, w, a: unit_row_map_codes(fmap, x, w, a), (x, w, alpha))
    # The reconstruction alone: the decoder's weight gradient without the codes' own term.
    assert torch.autograd.gradcheck(lambda x, w, a: unit_row_map_pair(fmap, x, w, None, a)[1], (x, w, alpha))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", list(MAPS))
def test_unit_row_map_pair_matches_normalised_copies(name, tied):
    """Against the layer written with normalised copies of W (and D) and autograd: the
    same codes, reconstruction and gradients, off the unit sphere and with a zero row (tied:
    its gradient stays zero; untied, the decoder's row still reaches it through 1 / EPS,
    as with autograd)."""
    fmap, x, w, d = _map_inputs(name, seed=3, rows=5)
    _, _, _, apply, adjoint = MAPS[name]
    w.view(-1, w.shape[-1])[1] = 0.0
    with torch.no_grad():
        scaled = torch.rand(w.shape[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        w.mul_(0.2 + 2 * scaled.unsqueeze(-1))  # rows of norm far from 1
    results = []
    for function in ("ours", "autograd"):
        x_ = x.clone().requires_grad_(True)
        weight = w.clone().requires_grad_(True)
        decoder = None if tied else d.clone().requires_grad_(True)
        alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        if function == "ours":
            codes, decoded = unit_row_map_pair(fmap, x_, weight, decoder, alpha)
            alone = unit_row_map_codes(fmap, x_, weight, alpha)
        else:
            codes = alpha * apply(x_, unit_rows(weight))
            decoded = adjoint(codes, unit_rows(weight if tied else decoder))
            alone = codes
        target = torch.randn(decoded.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        loss = (decoded - target).pow(2).sum() + torch.sqrt(codes.pow(2) + 0.01).sum()
        loss.backward()
        results.append((codes.detach(), decoded.detach(), alone.detach(), x_.grad, weight.grad,
                        alpha.grad) + (() if tied else (decoder.grad,)))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference)
    if tied:
        assert results[0][4].view(-1, w.shape[-1])[1].abs().max() == 0
