"""The one-buffer autograd functions (terabrain.nn.shared_weight) against plain autograd:
same values, same gradients (gradcheck in float64, and a comparison with the formula
written with ordinary tensor operations), and the models that use them."""

from __future__ import annotations

import pytest
import torch

from terabrain.nn.autoencoder import RICA, Autoencoder
from terabrain.nn.shared_weight import tied_pair, unit_row_pair
from terabrain.nn.unit_rows import unit_rows


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
