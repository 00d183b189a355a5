"""Applying qparams to tensors: quantize / dequantize / fake_quantize, and SQNR of the result."""

import math

import pytest
import torch

from mono_quant.core.qparams import quant_range
from mono_quant.core.quantize import dequantize, fake_quantize, quantization_sqnr, quantize, sqnr


def test_quantize_codes_by_hand():
    x = torch.tensor([0.0, 0.24, 0.26, -0.75, 1.25, 100.0, -100.0])
    q = quantize(x, torch.tensor(0.5), torch.tensor(3), -8, 7)
    # round half to even: 0.48 -> 0, 0.52 -> 1, -1.5 -> -2, 2.5 -> 2; then + 3 and clamp to [-8, 7]
    assert q.tolist() == [3, 3, 4, 1, 5, 7, -8]
    assert q.dtype == torch.int32
    assert dequantize(q, torch.tensor(0.5), torch.tensor(3)).tolist() == [0.0, 0.0, 0.5, -1.0, 1.0, 2.0, -5.5]


def test_quantize_non_finite_and_huge_values_clamp_to_the_right_end():
    x = torch.tensor([float("inf"), float("-inf"), 1e30, -1e30, float("nan")])
    q = quantize(x, torch.tensor(0.1), torch.tensor(10), 0, 255)
    assert q.tolist() == [255, 0, 255, 0, 10]


@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint8])
def test_fake_quantize_matches_torch_per_tensor(dtype):
    qmin, qmax = quant_range(dtype)
    x = torch.randn(1023) * 4
    scale, zp = torch.tensor(2.0**-5), torch.tensor(0 if qmin < 0 else 128)  # power of two: x / s is exact
    got = fake_quantize(x, scale, zp, qmin, qmax)
    want = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("ch_axis", [1, -1])
def test_fake_quantize_per_channel_matches_torch(ch_axis):
    x = torch.randn(3, 5, 7) * torch.arange(1, 8)  # channel scales differ along the last dim
    axis = ch_axis % x.dim()
    c = x.shape[axis]
    scale = 2.0 ** -torch.arange(2, 2 + c).float()
    zp = torch.arange(c, dtype=torch.int32) - 2
    got = fake_quantize(x, scale, zp, -128, 127, ch_axis)
    want = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, -128, 127)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fake_quantize_is_exact_on_the_grid():
    scale, zp = torch.tensor(0.125), torch.tensor(-3)
    codes = torch.arange(-128, 128, dtype=torch.int32)
    x = dequantize(codes, scale, zp)
    assert torch.equal(quantize(x, scale, zp, -128, 127), codes)
    assert torch.equal(fake_quantize(x, scale, zp, -128, 127), x)
    assert math.isinf(float(quantization_sqnr(x, scale, zp, -128, 127)))


def test_sqnr_hand_computed_int8():
    # scale 0.5: 1.0, -0.5, 2.0 are on the grid; 0.26 -> 0.5 (error 0.24)
    x = torch.tensor([1.0, -0.5, 0.26, 2.0], dtype=torch.float64)
    signal = 1.0 + 0.25 + 0.26**2 + 4.0
    noise = 0.24**2
    got = quantization_sqnr(x, torch.tensor(0.5), torch.tensor(0), -128, 127)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert float(got) == pytest.approx(19.6530, abs=1e-3)


def test_sqnr_hand_computed_uint4_with_clipping():
    # uint4 [0, 15], scale 0.25, zero point 4: representable [-1.0, 2.75]
    x = torch.tensor([3.0, -2.0, 0.3, 0.0])
    # 3.0 clips to 2.75 (error 0.25); -2.0 clips to -1.0 (error 1.0); 0.3 -> 0.25 (error 0.05)
    signal = 9.0 + 4.0 + 0.09
    noise = 0.25**2 + 1.0 + 0.05**2
    got = quantization_sqnr(x, torch.tensor(0.25), torch.tensor(4), 0, 15)
    assert float(got) == pytest.approx(10 * math.log10(signal / noise), rel=1e-5)


def test_sqnr_special_cases():
    x = torch.tensor([1.0, float("nan"), -2.0])
    assert math.isinf(float(sqnr(x, x.clone())))  # non-finite entries are left out
    assert float(sqnr(torch.zeros(4), torch.zeros(4))) == float("inf")
    assert float(sqnr(torch.zeros(4), torch.ones(4))) == float("-inf")
    # 10 dB: noise power is a tenth of the signal power
    x_hat = torch.tensor([1.0, 1.0 - math.sqrt(0.2)])
    assert float(sqnr(torch.tensor([1.0, 1.0]), x_hat)) == pytest.approx(10.0)


def test_sqnr_per_channel_beats_per_tensor_on_outlier_channel():
    x = torch.randn(256, 16)
    x[:, 3] *= 50  # one outlier channel, as in LLM activations
    amax_t = x.abs().max()
    amax_c = x.abs().amax(0)
    per_tensor = quantization_sqnr(x, amax_t / 127, torch.tensor(0), -128, 127)
    zeros = torch.zeros(16, dtype=torch.int32)
    per_channel = quantization_sqnr(x, amax_c / 127, zeros, -128, 127, ch_axis=-1)
    assert float(per_channel) > float(per_tensor)


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint8, torch.int4, torch.uint4])
def test_values_near_the_float32_limit_fake_quantize_to_finite_values(qscheme, dtype):
    from mono_quant import MinMaxObserver

    big = torch.finfo(torch.float32).max
    x = torch.tensor([-big, 0.0, 1.0, big / 3, -big / 7])
    obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, backend="torch")
    obs(x[:3])
    scale, zp = obs.calculate_qparams()
    qmin, qmax = quant_range(dtype)
    assert torch.isfinite(scale)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.isfinite(out).all(), out
    assert out[0] <= -big / 2  # the end of the range stays at the end, saturated, not -inf
    assert math.isfinite(float(quantization_sqnr(x[:3], scale, zp, qmin, qmax)))


def test_dequantize_saturates_only_past_the_float32_range():
    big = torch.finfo(torch.float32).max
    q = torch.tensor([-128, -1, 0, 127], dtype=torch.int32)
    scale = torch.tensor(big / 127.5)
    got = dequantize(q, scale, torch.tensor(0))
    want = q.to(torch.float64) * float(scale)  # exact, then the float32 range
    assert got[0] == -big and torch.equal(got[1:], want[1:].to(torch.float32))
