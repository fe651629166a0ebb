"""Compressors on one process: round trips, error feedback, payload sizes = the formulas."""

import math

import pytest
import torch

from terabrain.parallel.compressors import (
    Adaptive, HalfPrecision, OneBit, PackedBfloat16, Threshold, as_columns, bf16_as_words,
    build_compressor, pack_bits, unpack_bits, words_as_bf16,
)
from terabrain.parallel.exchange import (
    all_reduce_bytes, column_ranges, exchange_columns, exchange_shape,
)


def bf16(values) -> torch.Tensor:
    """What a value is after a round trip through bf16 (round to nearest even)."""
    return torch.as_tensor(values, dtype=torch.float32).to(torch.bfloat16).float()


def test_bits_round_trip_all_positions():
    generator = torch.Generator().manual_seed(0)
    for count in (1, 31, 32, 33, 1000):
        bits = torch.rand(count, generator=generator) > 0.5
        words = pack_bits(bits)
        assert words.dtype == torch.int32 and words.numel() == math.ceil(count / 32)
        assert torch.equal(unpack_bits(words, count), bits)
    # The sign bit of a word is bit 31: all ones is -1 in int32.
    assert pack_bits(torch.ones(32, dtype=torch.bool)).item() == -1


def test_onebit_reconstructs_column_means_of_each_sign():
    x = torch.tensor([[1.0, 3.0, -2.0, -4.0], [0.5, 0.5, 0.5, -1.0]])
    compressor = OneBit()
    payload, ctx = compressor.compress(x)
    # 8 sign bits in one word, and the two bf16 values of each column in one word.
    assert payload.numel() == compressor.payload_words(2, 4) == 1 + 2
    expected = torch.tensor([[2.0, 2.0, -3.0, -3.0], [0.5, 0.5, 0.5, -1.0]])
    assert torch.equal(compressor.decompress(payload, ctx), expected)
    # Per column the reconstruction keeps the column's sum (exactly, where bf16 holds the means).
    assert torch.allclose(compressor.decompress(payload, ctx).sum(1), x.sum(1))


def test_onebit_values_are_rounded_to_bf16_and_nothing_else():
    x = torch.tensor([[0.1, 0.3, -1 / 3, -0.2]])
    compressor = OneBit()
    out = compressor.decompress(*compressor.compress(x))
    assert torch.equal(out, torch.cat([bf16([0.2, 0.2]), bf16([-(1 / 3 + 0.2) / 2] * 2)]).view(1, 4))
    assert not torch.equal(out, torch.tensor([[0.2, 0.2, -(1 / 3 + 0.2) / 2, -(1 / 3 + 0.2) / 2]]))
    # bf16 keeps fp32's exponent range, where fp16 would overflow or flush to zero.
    extremes = torch.tensor([[1e6, 3e6, -1e6, -3e6], [1e-9, 3e-9, -1e-9, -3e-9]])
    out = compressor.decompress(*compressor.compress(extremes))
    expected = torch.tensor([[2e6, 2e6, -2e6, -2e6], [2e-9, 2e-9, -2e-9, -2e-9]])
    assert torch.allclose(out, expected, rtol=2**-8, atol=0)


def test_threshold_sends_entries_beyond_tau_as_index_and_sign():
    x = torch.tensor([[0.1, -0.7, 0.3], [2.0, -0.2, 0.0]])
    compressor = Threshold(tau=0.5)
    payload, ctx = compressor.compress(x)
    assert payload.numel() == 2  # -0.7 and 2.0
    assert torch.equal(compressor.decompress(payload, ctx),
                       torch.tensor([[0.0, -0.5, 0.0], [0.5, 0.0, 0.0]]))


def test_adaptive_sends_the_largest_proportion_of_each_column():
    x = torch.tensor([[0.1, -5.0, 0.2, 4.0, 0.0, 0.0, 0.0, 6.0],
                      [-1.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1]])
    compressor = Adaptive(proportion=3 / 8)
    payload, ctx = compressor.compress(x)
    assert payload.numel() == compressor.payload_words(2, 8) == 2 * 3 + 2
    out = compressor.decompress(payload, ctx)
    # Column 0 sends -5, 4, 6: positives as their mean 5, the negative as -5.
    assert torch.equal(out[0], torch.tensor([0.0, -5.0, 0.0, 5.0, 0.0, 0.0, 0.0, 5.0]))
    # Column 1 sends -1, -3 and 0.1 (in bf16: 0.10009765625).
    assert torch.equal(out[1], torch.cat([torch.tensor([-2.0, -2.0, 0, 0, 0, 0, 0]), bf16([0.1])]))


def test_packed_bf16_round_trip_two_per_word():
    generator = torch.Generator().manual_seed(3)
    for count in (0, 1, 7, 8):
        x = torch.randn(count, 1, generator=generator)
        compressor = PackedBfloat16()
        payload, ctx = compressor.compress(x)
        assert payload.dtype == torch.int32
        assert payload.numel() == compressor.payload_words(count, 1) == math.ceil(count / 2)
        out = compressor.decompress(payload, ctx)
        assert out.shape == (count, 1) and torch.equal(out, bf16(x))
        assert torch.all((out - x).abs() <= 2**-8 * x.abs())
    assert torch.equal(words_as_bf16(bf16_as_words(torch.tensor([1.0, -2.5, 3.0])), 3),
                       torch.tensor([1.0, -2.5, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(dtype):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    compressor = HalfPrecision(dtype)
    payload, ctx = compressor.compress(x)
    assert payload.dtype == dtype and payload.element_size() * payload.numel() == 2 * x.numel()
    tolerance = 1e-3 if dtype == torch.float16 else 1e-2
    assert torch.allclose(compressor.decompress(payload, ctx), x, rtol=tolerance, atol=tolerance)


def test_bf16_vectors_with_error_feedback_lose_nothing_over_time():
    """1 + 2^-10 rounds to 1 in bf16 every time: sent naively, the running sum falls behind by
    2^-10 per step; with error feedback the rounding is carried and sent once it adds up."""
    compressor = PackedBfloat16()
    gradient = torch.full((5, 1), 1 + 2**-10)
    residual, sent_sum, naive_sum = torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(5, 1)
    for _ in range(1000):
        corrected = gradient + residual
        sent = compressor.decompress(*compressor.compress(corrected))
        residual = corrected - sent
        sent_sum += sent
        naive_sum += compressor.decompress(*compressor.compress(gradient))
    true_sum = 1000 * gradient
    assert torch.allclose(sent_sum, true_sum - residual, rtol=0, atol=1e-4)
    assert (true_sum - sent_sum).abs().max() <= 2**-8  # one rounding step, not 1000
    assert torch.allclose(true_sum - naive_sum, torch.full((5, 1), 1000 * 2**-10))


@pytest.mark.parametrize("scheme", ["onebit", "threshold", "adaptive"])
def test_error_feedback_keeps_the_running_sum_on_track(scheme):
    """sum of what was sent = sum of the true gradients - the current residual, so the
    running sums differ by one step's worth at most, however many steps pass."""
    generator = torch.Generator().manual_seed(2)
    compressor = build_compressor(scheme, tau=0.05, proportion=1 / 8)
    residual = torch.zeros(32, 64)
    true_sum = torch.zeros(32, 64)
    sent_sum = torch.zeros(32, 64)
    for _ in range(200):
        gradient = torch.randn(32, 64, generator=generator) * 0.1 + 0.02
        corrected = gradient + residual
        payload, ctx = compressor.compress(corrected)
        sent = compressor.decompress(payload, ctx)
        residual = corrected - sent
        true_sum += gradient
        sent_sum += sent
    assert torch.allclose(sent_sum, true_sum - residual, atol=1e-3)
    drift = (sent_sum - true_sum).abs().mean() / true_sum.abs().mean()
    assert drift < 0.05, drift  # bounded, while the sums grow with the steps
    # Without error feedback the drift grows with the steps (onebit, adaptive are biased).
    if scheme != "threshold":
        naive = torch.zeros(32, 64)
        generator.manual_seed(2)
        for _ in range(200):
            gradient = torch.randn(32, 64, generator=generator) * 0.1 + 0.02
            payload, ctx = compressor.compress(gradient)
            naive += compressor.decompress(payload, ctx)
        assert (naive - true_sum).abs().mean() / true_sum.abs().mean() > 5 * drift


def test_payload_sizes_are_the_formulas():
    x = torch.randn(100, 77)
    # Two bf16 reconstruction values per column: one word.
    assert OneBit().compress(x)[0].numel() == math.ceil(7700 / 32) + 100
    assert Adaptive(0.1).compress(x)[0].numel() == 100 * 8 + 100
    assert PackedBfloat16().compress(torch.randn(77, 1))[0].numel() == 39
    tau = float(x.abs().quantile(0.9))
    assert Threshold(tau).compress(x)[0].numel() == int((x.abs() > tau).sum())
    # Columns of (shape[0], rest): a weight (out, in) has one column per input; a 1-D
    # tensor is one column. The view writes through to the tensor.
    assert as_columns(torch.zeros(5)).shape == (1, 5)
    weight = torch.zeros(4, 3, 2)
    assert as_columns(weight).shape == (6, 4)
    as_columns(weight)[1] = 1.0
    assert torch.equal(weight[:, 0, 1], torch.ones(4)) and weight.sum() == 4
    # The exchange splits a vector's entries over the ranks: one column of length 1 each.
    bias = torch.zeros(5)
    assert exchange_columns(bias).shape == (5, 1) == exchange_shape(bias.shape)
    exchange_columns(bias)[2] = 1.0
    assert bias[2] == 1.0
    assert exchange_shape(weight.shape) == (6, 4)


def test_column_ranges_match_dtensor_shard0():
    assert column_ranges(5, 2) == [(0, 3), (3, 5)]
    assert column_ranges(1, 4) == [(0, 1), (1, 1), (1, 1), (1, 1)]
    assert column_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert all_reduce_bytes(1000, 4, 2) == 4000
    assert all_reduce_bytes(1000, 4, 4) == 6000
    assert all_reduce_bytes(1000, 4, 1) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("scheme", ["onebit", "threshold", "adaptive", "bf16-packed"])
def test_compressors_run_on_the_gpu_and_agree_with_the_cpu(scheme):
    x = torch.randn(96, 40, generator=torch.Generator().manual_seed(4))
    compressor = (PackedBfloat16() if scheme == "bf16-packed"
                  else build_compressor(scheme, tau=1.0, proportion=1 / 8))
    on_cpu = compressor.decompress(*compressor.compress(x))
    payload, ctx = compressor.compress(x.cuda())
    assert payload.is_cuda
    assert torch.allclose(compressor.decompress(payload, ctx).cpu(), on_cpu)
