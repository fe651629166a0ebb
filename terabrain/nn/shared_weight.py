"""Autograd functions for layers that use one weight twice (an encoder and its transposed
decoder), written so that the weight's gradient is ONE buffer.

Autograd's default gives each use of a weight its own full-size gradient and sums them
(a transient second copy of the largest tensor), and RICA's row normalisation adds a
normalised copy of W plus the gradient of the normalisation (two more). Here the backward
pass writes the decoder's contribution into one buffer (the last step's memory, where it is
free: terabrain.nn.gradient_buffers) and adds the encoder's (and the
normalisation's) into the same buffer in place (``addmm_``, ``addcmul_``), so the peak of
a step is weights + one gradient + optimizer state, plus batch-sized activations.

Both functions return ``(codes, codes_W)``: the codes and their projection back through W
(``codes @ W``, before any decoder bias or activation, which stay ordinary autograd since
they are batch-sized). Each is tested against plain autograd (tests/test_shared_weight.py).
Plain tensors and DTensors alike: every operation here is one DTensor propagates. Under
autocast (precision bf16) the forward pass runs in the autocast dtype; the backward pass
brings the saved batch-sized values and incoming gradients to the weight's dtype, so the
weight's gradient has the weight's dtype.
"""

from __future__ import annotations

import torch

from terabrain.nn import gradient_blocks, gradient_buffers
from terabrain.nn.unit_rows import EPS


def _derivative_from_output(activation: str, output: torch.Tensor) -> torch.Tensor | None:
    """d act / d input, from the activation's output (None: identity, the derivative is 1)."""
    if activation == "sigmoid":
        return output * (1 - output)
    if activation == "tanh":
        return 1 - output * output
    if activation == "relu":
        return (output > 0).to(output.dtype)
    if activation == "identity":
        return None
    raise ValueError(f"no derivative for activation {activation!r}")


def _like_weight(tensors, dtype=None):
    """``tensors`` (None kept) in ``dtype``, or in the dtype of the second (the weight)."""
    dtype = dtype if dtype is not None else tensors[1].dtype
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
                "identity": lambda t: t}


class _TiedPair(torch.autograd.Function):
    """``codes = act(x W^T + b)``, ``codes_W = codes @ W``."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        codes = _ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias))
        ctx.activation = activation
        ctx.listening = gradient_blocks.listener_for(weight)
        ctx.buffer = gradient_buffers.buffer_for(weight)
        ctx.save_for_backward(x, weight, codes)
        ctx.set_materialize_grads(False)
        return codes, codes @ weight

    @staticmethod
    def backward(ctx, grad_codes, grad_codes_w):
        x, weight, codes = _like_weight(ctx.saved_tensors)
        grad_codes, grad_codes_w = _like_weight((grad_codes, grad_codes_w), weight.dtype)
        grad_codes_total = None
        if grad_codes_w is not None:
            grad_codes_total = grad_codes_w @ weight.t()
        if grad_codes is not None:
            grad_codes_total = grad_codes if grad_codes_total is None else grad_codes_total + grad_codes
        if grad_codes_total is None:
            return None, None, None, None
        derivative = _derivative_from_output(ctx.activation, codes)
        grad_z = grad_codes_total if derivative is None else grad_codes_total * derivative
        grad_weight = None
        if ctx.needs_input_grad[1]:
            def fill(out, start, stop):
                if grad_codes_w is None:
                    torch.mm(grad_z[:, start:stop].t(), x, out=out)
                    return
                torch.mm(codes[:, start:stop].t(), grad_codes_w, out=out)  # the decoder's
                out.addmm_(grad_z[:, start:stop].t(), x)      # the encoder's, into the same rows
            grad_weight = _weight_gradient(weight, ctx.listening, ctx.buffer, fill)
        grad_x = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad_z.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def _weight_gradient(weight, listening, buffer, fill):
    """The weight's gradient, written by ``fill(out, start, stop)`` (rows ``[start, stop)``)
    into the memory of the last one where that is free (terabrain.nn.gradient_buffers): in
    one call (one product per term, as fast as it gets alone), or block by block for a
    listener (terabrain.nn.gradient_blocks) that acts on the rows while the rest are computed."""
    gradient = gradient_buffers.new_gradient(weight, buffer)
    if listening is None:
        fill(gradient, 0, weight.shape[0])
        return gradient
    return gradient_blocks.fill_in_blocks(gradient, listening, fill)


def tied_pair(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str):
    """``(act(x W^T + b), act(x W^T + b) @ W)`` with one gradient buffer for ``weight``."""
    return _TiedPair.apply(x, weight, bias, activation)


class _UnitRowPair(torch.autograd.Function):
    """RICA with unit-norm rows, without the normalised copy of W: with ``s = 1 / |W_j|``,
    ``codes = alpha (x W^T) s`` and ``codes_W = (codes s) @ W``, the same values as
    ``alpha x Wn^T`` and ``codes @ Wn`` for ``Wn = W s``."""

    @staticmethod
    def forward(ctx, x, weight, alpha):
        norms = weight.norm(dim=1)
        scale = 1.0 / norms.clamp_min(EPS)
        projected = (x @ weight.t()) * scale                  # x Wn^T
        codes = alpha * projected
        ctx.listening = gradient_blocks.listener_for(weight)
        ctx.buffer = gradient_buffers.buffer_for(weight)
        ctx.save_for_backward(x, weight, alpha, norms, scale, projected)
        ctx.set_materialize_grads(False)
        return codes, (codes * scale) @ weight

    @staticmethod
    def backward(ctx, grad_codes, grad_codes_w):
        x, weight, alpha, norms, scale, projected = _like_weight(ctx.saved_tensors)
        grad_codes, grad_codes_w = _like_weight((grad_codes, grad_codes_w), weight.dtype)
        codes = alpha * projected
        scaled_codes = None
        grad_scale = torch.zeros_like(scale)
        grad_codes_total = grad_codes
        if grad_codes_w is not None:
            scaled_codes = codes * scale
            grad_v = grad_codes_w @ weight.t()
            grad_scale = (grad_v * codes).sum(0)
            from_decoder = grad_v * scale
            grad_codes_total = from_decoder if grad_codes is None else from_decoder + grad_codes
        if grad_codes_total is None:
            return None, None, None
        grad_alpha = (grad_codes_total * projected).sum() if ctx.needs_input_grad[2] else None
        grad_projected = alpha * grad_codes_total
        grad_scale = grad_scale + (grad_projected * (projected / scale)).sum(0)  # u = y s
        grad_y = grad_projected * scale
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # s = 1 / max(|W_j|, EPS): ds/dW_j = -W_j / |W_j|^3 where |W_j| > EPS, else 0.
            row_factor = torch.where(norms > EPS, -grad_scale * scale * scale * scale,
                                     torch.zeros_like(grad_scale)).unsqueeze(1)

            def fill(out, start, stop):
                if scaled_codes is None:
                    torch.mm(grad_y[:, start:stop].t(), x, out=out)
                else:
                    torch.mm(scaled_codes[:, start:stop].t(), grad_codes_w, out=out)  # decoder's
                    out.addmm_(grad_y[:, start:stop].t(), x)   # the encoder's
                out.addcmul_(weight[start:stop], row_factor[start:stop])  # the normalisation's
            grad_weight = _weight_gradient(weight, ctx.listening, ctx.buffer, fill)
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, grad_alpha


def unit_row_pair(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor):
    """``(alpha x Wn^T, (alpha x Wn^T) @ Wn)`` with ``Wn`` W's rows at unit norm, computed
    without ``Wn`` and with one gradient buffer for ``weight``."""
    return _UnitRowPair.apply(x, weight, alpha)


def _add_normalisation_gradient_(grad_weight, weight, norms, grad_scale) -> None:
    """Add the row normalisation's share, in place: with ``s = 1 / max(|W_j|, EPS)``,
    ``ds/dW_j = -W_j s^3`` where ``|W_j| > EPS``, else 0 (a zero row stays zero)."""
    scale = 1.0 / norms.clamp_min(EPS)
    row_factor = torch.where(norms > EPS, -grad_scale * scale * scale * scale,
                             torch.zeros_like(grad_scale))
    grad_weight.addcmul_(weight, row_factor.unsqueeze(-1))


class _UnitRowMapPair(torch.autograd.Function):
    """A deep network's RICA layer (terabrain.nn.deep) through any filter map ``A``
    (terabrain.nn.filter_maps): with ``s = 1 / |W_j|`` per hidden unit, ``codes = alpha
    s A(W) x`` and ``decoded = A(D)^T (s_D codes)`` (``D = W`` tied), the values of
    ``alpha A(W/|W|) x`` and ``A(D/|D|)^T codes`` without forming either normalised copy.
    The backward pass writes the decoder's weight gradient into a fresh buffer and adds the
    encoder's (tied) and each normalisation's into it in place. ``decode`` False: codes
    only (a layer's ``encode``)."""

    @staticmethod
    def forward(ctx, x, weight, decoder_weight, alpha, fmap, decode):
        # bf16 weights (precision bf16-weights): the products run in the weights' dtype.
        x = fmap.native(x.to(weight.dtype))
        norms = weight.norm(dim=-1)
        projected = fmap.apply(x, weight)
        projected.mul_(fmap.unit_scale(1.0 / norms.clamp_min(EPS)))  # s A(W) x
        codes = alpha * projected
        decoder_norms = None
        ctx.fmap, ctx.tied = fmap, decoder_weight is None
        ctx.set_materialize_grads(False)
        if not decode:
            ctx.save_for_backward(x, weight, None, alpha, norms, None, projected)
            return fmap.public_codes(codes)
        decoder = weight if ctx.tied else decoder_weight
        decoder_norms = norms if ctx.tied else decoder.norm(dim=-1)
        decoded = fmap.adjoint(codes * fmap.unit_scale(1.0 / decoder_norms.clamp_min(EPS)), decoder)
        ctx.save_for_backward(x, weight, decoder_weight, alpha, norms, decoder_norms, projected)
        return fmap.public_codes(codes), fmap.public_input(decoded)

    @staticmethod
    def backward(ctx, grad_codes, grad_decoded=None):
        x, weight, decoder_weight, alpha, norms, decoder_norms, projected = _like_weight(
            ctx.saved_tensors)
        fmap = ctx.fmap
        grad_codes, grad_decoded = _like_weight((grad_codes, grad_decoded), weight.dtype)
        wants_weight, wants_decoder = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        codes = alpha * projected
        total = None if grad_codes is None else fmap.native(grad_codes)
        grad_weight = grad_decoder = grad_scale = None
        if grad_decoded is not None:
            decoder = weight if ctx.tied else decoder_weight
            decoder_scale = fmap.unit_scale(1.0 / decoder_norms.clamp_min(EPS))
            grad_decoded = fmap.native(grad_decoded)
            wants = wants_weight if ctx.tied else wants_decoder
            grad_v = fmap.apply(grad_decoded, decoder)   # d loss / d (s_D codes)
            if wants:                                     # the decoder's contribution
                grad_d = fmap.weight_gradient(grad_decoded, codes * decoder_scale)
                grad_scale_d = fmap.unit_sum(grad_v * codes)
                if ctx.tied:
                    grad_weight, grad_scale = grad_d, grad_scale_d
                else:
                    _add_normalisation_gradient_(grad_d, decoder_weight, decoder_norms, grad_scale_d)
                    grad_decoder = grad_d
            from_decoder = grad_v.mul_(decoder_scale)
            total = from_decoder if total is None else from_decoder.add_(total)
        if total is None:
            return None, None, grad_decoder, None, None, None
        grad_alpha = (total * projected).sum() if ctx.needs_input_grad[3] else None
        grad_projected = total * alpha
        scale = fmap.unit_scale(1.0 / norms.clamp_min(EPS))
        if wants_weight:
            # d/ds of <g, s A(W) x> = sum(g * projected) / s.
            from_scale = fmap.unit_sum(grad_projected * projected) * norms.clamp_min(EPS)
            grad_scale = from_scale if grad_scale is None else grad_scale.add_(from_scale)
        grad_raw = grad_projected.mul_(scale)             # d loss / d A(W) x
        if wants_weight:
            grad_weight = fmap.weight_gradient(x, grad_raw, out=grad_weight)  # the encoder's
            _add_normalisation_gradient_(grad_weight, weight, norms, grad_scale)
        grad_x = fmap.public_input(fmap.adjoint(grad_raw, weight)) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, grad_decoder, grad_alpha, None, None


def unit_row_map_pair(fmap, x: torch.Tensor, weight: torch.Tensor,
                      decoder_weight: torch.Tensor | None, alpha: torch.Tensor):
    """``(alpha A(Wn) x, A(Dn)^T (alpha A(Wn) x))`` for the filter map ``fmap`` with unit-norm
    rows ``Wn``, ``Dn`` (``decoder_weight`` None: tied, ``Dn = Wn``), computed without the
    normalised copies and with one gradient buffer per weight. (N, C, H, W) in and out."""
    return _UnitRowMapPair.apply(x, weight, decoder_weight, alpha, fmap, True)


def unit_row_map_codes(fmap, x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor):
    """``alpha A(Wn) x`` alone (a layer's codes), without the normalised copy of W."""
    return _UnitRowMapPair.apply(x, weight, None, alpha, fmap, False)
