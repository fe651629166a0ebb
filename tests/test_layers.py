"""The layers of deep networks: untied locally connected, local contrast normalization,
L2 pooling, each against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from terabrain.nn.local import LocallyConnected2d, locally_connected, locally_connected_transpose
from terabrain.nn.normalization import LocalContrastNorm, gaussian_window, local_contrast_normalize
from terabrain.nn.pooling import L2Pool2d



@pytest.fixture(autouse=True)
def double_precision():
    """Reference comparisons at double precision; restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def unfold_order(layer):
    """The weight with filter values in F.unfold's (C, kh, kw) order (the layer's are
    (kh, kw, C))."""
    k, c = layer.kernel_size, layer.in_channels
    w = layer.weight
    return w.reshape(w.shape[0], w.shape[1], k, k, c).permute(0, 1, 4, 2, 3).reshape(w.shape)


def reference_forward(layer, x):
    """Explicit unfolding: every location's patch times its own filters."""
    cols = F.unfold(x, layer.kernel_size, stride=layer.stride)  # (N, K, L)
    y = torch.einsum("nkl,lfk->nfl", cols, unfold_order(layer))
    y = y.reshape(x.shape[0], layer.out_channels, *layer.output_size)
    return y if layer.bias is None else y + layer.bias


def reference_transpose(layer, y):
    cols = torch.einsum("nfl,lfk->nkl", y.flatten(2), unfold_order(layer))
    return F.fold(cols, layer.input_size, layer.kernel_size, stride=layer.stride)


CASES = [
    # in, out, size, kernel, stride, bias
    (3, 4, (12, 11), 4, 2, False),
    (2, 3, (9, 9), 3, 1, True),
    (1, 2, (10, 13), 3, 4, True),   # stride > kernel: gaps between fields
    (3, 5, (16, 16), 5, 3, False),  # kernel not a multiple of stride
    (4, 1, (7, 8), 7, 1, False),    # one row of locations
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}f{c[1]}k{c[3]}s{c[4]}b{int(c[5])}")
@pytest.mark.parametrize("block_bytes", [1, 5000, 40000, 2**30],
                         ids=["one-location", "runs-in-a-row", "several-rows", "one-block"])
def test_locally_connected_equals_unfolding_reference(case, block_bytes):
    cin, cout, size, kernel, stride, bias = case
    layer = LocallyConnected2d(cin, cout, size, kernel, stride, bias=bias, seed=3,
                               block_bytes=block_bytes)
    if bias:
        torch.nn.init.normal_(layer.bias)
    assert layer.weight.shape == (layer.output_size[0] * layer.output_size[1], cout,
                                  cin * kernel * kernel)
    x = torch.randn(5, cin, *size, requires_grad=True)
    y = layer(x)
    expected = reference_forward(layer, x)
    torch.testing.assert_close(y, expected)

    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), [x, layer.weight]
                                + ([layer.bias] if bias else []))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, layer.weight]
                                         + ([layer.bias] if bias else []))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)

    codes = torch.randn(5, cout, *layer.output_size, requires_grad=True)
    back = layer.transpose(codes)
    torch.testing.assert_close(back, reference_transpose(layer, codes))
    # The adjoint: <A x, y> == <x, A^T y> (no bias in A).
    a_x = y - layer.bias if bias else y
    assert torch.allclose((a_x * codes).sum(), (x * back).sum(), rtol=1e-10)
    upstream = torch.randn_like(back)
    got = torch.autograd.grad((back * upstream).sum(), [codes, layer.weight])
    want = torch.autograd.grad((reference_transpose(layer, codes) * upstream).sum(),
                               [codes, layer.weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_locally_connected_and_transpose_pass_gradcheck_including_second_use():
    x = torch.randn(2, 2, 6, 7, requires_grad=True)
    w = torch.randn(2 * 3, 2, 2 * 9, requires_grad=True)  # 2 x 3 locations, 3x3 kernel, stride 2
    y = torch.randn(2, 2, 2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: locally_connected(x, w, 3, 2, (2, 3), block_bytes=1), (x, w))
    assert torch.autograd.gradcheck(
        lambda y, w: locally_connected_transpose(y, w, 3, 2, (6, 7), block_bytes=1), (y, w))
    # RICA's reconstruction W^T (W x): both maps through the same weight.
    assert torch.autograd.gradcheck(lambda x, w: locally_connected_transpose(
        locally_connected(x, w, 3, 2, (2, 3)), w, 3, 2, (6, 7)), (x, w))


def test_locations_initialised_alone_equal_those_rows_of_the_whole_layer():
    layer = LocallyConnected2d(3, 4, (20, 20), 4, 2, seed=11)  # 9 x 9 locations
    ho, wo = layer.output_size
    rows = slice(3, 7)
    part = torch.empty((rows.stop - rows.start) * wo, 4, 3 * 16)
    layer.init_parameter_("weight", part, rows.start * wo)
    torch.testing.assert_close(part, layer.weight.detach()[rows.start * wo : rows.stop * wo])
    again = LocallyConnected2d(3, 4, (20, 20), 4, 2, seed=11)
    assert torch.equal(again.weight, layer.weight)
    assert not torch.equal(LocallyConnected2d(3, 4, (20, 20), 4, 2, seed=12).weight, layer.weight)
    bound = 1 / math.sqrt(3 * 16)
    assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 3


def test_normalize_makes_every_unit_row_unit_norm_and_filters_are_rows():
    layer = LocallyConnected2d(3, 4, (10, 10), 4, 3, seed=2)
    layer.normalize_()
    rows = layer.filters()
    assert rows.shape == (layer.weight.shape[0] * 4, 3 * 16)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)))


def test_wrong_input_size_is_a_clear_error():
    layer = LocallyConnected2d(3, 4, (10, 10), 4, 3, seed=2)
    with pytest.raises(ValueError, match=r"expected input \(N, 3, 10, 10\), got \(1, 3, 12, 10\)"):
        layer(torch.randn(1, 3, 12, 10))
    with pytest.raises(ValueError, match="2 input channels, but the filters hold 3"):
        locally_connected(torch.randn(1, 2, 10, 10), layer.weight, 4, 3, (3, 3))


# --- local contrast normalization ----------------------------------------------------------


def local_statistics(y, kernel_size=9, sigma=None):
    """Gaussian-weighted local mean and standard deviation across channels, by direct sums
    over the window inside the image."""
    sigma = kernel_size / 4 if sigma is None else sigma
    taps = gaussian_window(kernel_size, sigma)
    window = torch.outer(taps, taps)
    n, c, h, w = y.shape
    r = kernel_size // 2
    mean = torch.empty(n, h, w)
    std = torch.empty(n, h, w)
    for i in range(h):
        for j in range(w):
            i0, i1, j0, j1 = max(0, i - r), min(h, i + r + 1), max(0, j - r), min(w, j + r + 1)
            weights = window[i0 - i + r : i1 - i + r, j0 - j + r : j1 - j + r]
            weights = weights / (weights.sum() * c)
            patch = y[:, :, i0:i1, j0:j1]
            m = (patch * weights).sum(dim=(1, 2, 3))
            mean[:, i, j] = m
            std[:, i, j] = (((patch - m.view(-1, 1, 1, 1)) ** 2) * weights).sum(dim=(1, 2, 3)).sqrt()
    return mean, std


def test_lcn_output_has_zero_local_mean_and_unit_local_contrast():
    generator = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 3, 32, 32
    # Texture whose contrast varies 20x across the image, on a sloping brightness.
    rows = torch.linspace(0, 1, h).view(1, 1, h, 1)
    amplitude = 0.1 + 1.9 * rows.expand(1, 1, h, w)
    x = 5 + 3 * rows + amplitude * torch.randn(n, c, h, w, generator=generator)
    y = LocalContrastNorm(9)(x)
    _, contrast_in = local_statistics(x)
    mean_out, contrast_out = local_statistics(y)
    # Subtractive step: the local mean of the result is ~0 (against 5 to 8 before); not
    # exactly, as the divisor varies across the window.
    assert mean_out.abs().mean() < 0.04 and mean_out.abs().max() < 0.2
    # Divisive step: local contrast ~1 where the input's contrast is above the floor, and
    # evened out (3x apart across the rows compared, before).
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert contrast_in[inner][:, -6:].mean() / contrast_in[inner][:, :6].mean() > 2.5
    strong = contrast_out[inner][:, -10:]
    assert 0.85 < strong.median() < 1.15, strong.median()
    assert (strong - 1).abs().max() < 0.35


def test_lcn_handles_single_images_and_constant_images():
    image = torch.rand(3, 20, 24)
    torch.testing.assert_close(local_contrast_normalize(image), local_contrast_normalize(image[None])[0])
    flat = torch.full((1, 3, 16, 16), 7.0, requires_grad=True)
    out = local_contrast_normalize(flat)
    assert out.abs().max() < 1e-6  # constant -> 0 up to the border too, no NaN
    out.sum().backward()
    assert torch.isfinite(flat.grad).all()
    with pytest.raises(ValueError, match="odd"):
        local_contrast_normalize(image, kernel_size=8)


# --- L2 pooling ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), (3, 1, 1), ((3, 2), 2, 0)])
def test_l2_pooling_matches_direct_sum_of_squares(kernel, stride, padding):
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    pool = L2Pool2d(kernel, stride, padding, eps=0.0)
    y = pool(x)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (kh, kw) if stride is None else (stride, stride)
    padded = F.pad(x, (padding,) * 4)
    expected = torch.empty_like(y)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            window = padded[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            expected[:, :, i, j] = window.pow(2).sum(dim=(2, 3)).sqrt()
    torch.testing.assert_close(y, expected)


def test_l2_pooling_gradient_is_finite_at_zero():
    x = torch.zeros(1, 2, 4, 4, requires_grad=True)
    y = L2Pool2d(2)(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(y, torch.full_like(y, 1e-4))
