"""FP8 targets: the spec, the scale against torchao's ``amax_to_scale`` and an exact oracle, quantize /
dequantize / fake_quantize with ``dtype=``, every observer with FP8, names and bad input."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import mono_quant as mq
from mono_quant.core.qparams import FP8_DTYPES, dtype_from_name, dtype_name, fp8_max

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
MAXES = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.float8_e4m3fnuz: 240.0,
         torch.float8_e5m2fnuz: 57344.0}  # fmt: skip


def amaxes() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rand = torch.rand(2000, generator=g, dtype=torch.float64) * 40 - 20  # log2 of the amax
    return torch.cat([torch.tensor([1e-6, 1.0, 448.0, 3e38]), (2.0**rand)]).to(torch.float32)


def test_spec_defaults_and_the_four_dtypes():
    assert FP8_DTYPES == tuple(FP8)
    for dtype in FP8:
        spec = mq.QuantSpec(dtype)
        assert spec.qscheme == "symmetric" and spec.is_fp8 and spec.fp8_max == MAXES[dtype]
        assert fp8_max(dtype) == torch.finfo(dtype).max
        assert dtype_from_name(dtype_name(dtype)) is dtype
    assert mq.QuantSpec(torch.qint8).qscheme == "affine"
    assert dtype_from_name("fp8_e4m3") is torch.float8_e4m3fn
    assert dtype_from_name("fp8_e5m2fnuz") is torch.float8_e5m2fnuz


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"qscheme": "affine"}, "FP8 quantization is symmetric"),
        ({"qscheme": torch.per_tensor_affine}, "FP8 quantization is symmetric"),
        ({"margin": -1}, "margin=-1 must be an int from 0 to 127"),
        ({"margin": 2.0}, "margin=2.0 must be an int"),
        ({"margin": True}, "margin=True"),
        ({"reduce_range": True}, "reduce_range=True"),
    ],
)
def test_bad_fp8_specs_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mq.QuantSpec(torch.float8_e4m3fn, **kwargs)
    with pytest.raises(ValueError, match=match):
        mq.MinMaxObserver(dtype=torch.float8_e4m3fn, **kwargs)


def test_margin_on_an_integer_dtype_and_fp8_in_quant_range_are_errors():
    with pytest.raises(ValueError, match="margin=1 is for the FP8 dtypes"):
        mq.QuantSpec(torch.qint8, margin=1)
    with pytest.raises(ValueError, match="float8 dtype and has no integer range"):
        mq.quant_range(torch.float8_e5m2)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("margin", [0, 1, 5])
def test_scale_is_the_nearest_float32_to_the_exact_formula(dtype, margin):
    a = amaxes()
    scale, zp = mq.calculate_qparams(-a / 2, a, mq.QuantSpec(dtype, margin=margin))
    assert zp.dtype == torch.int32 and not zp.any()
    eps = float(np.float32(torch.finfo(torch.float32).eps))
    for amax, s in zip(a.tolist(), scale.tolist(), strict=True):
        exact = Fraction(amax) * 2**margin / Fraction(MAXES[dtype])
        want = max(float(np.float32(float(exact))), eps)
        # float(exact) rounds once to float64, np.float32 once more: equal to one rounding unless the float64
        # lands on a float32 tie, which these amaxes never do (checked by the exactness of the comparison)
        assert s == want, (amax, s, want)


@pytest.mark.parametrize("dtype", FP8)
def test_scale_is_the_reciprocal_of_torchaos_amax_to_scale(dtype):
    float8_utils = pytest.importorskip("torchao.float8.float8_utils", reason="torchao is not installed")
    a = amaxes()
    ours, _ = mq.calculate_qparams(-a, a, mq.QuantSpec(dtype, eps=1e-30))
    theirs = float8_utils.amax_to_scale(a, dtype)  # fp8_max / amax in float64, rounded to float32
    # two correctly rounded reciprocals: their product is 1 within one float32 rounding each
    prod = ours.double() * theirs.double()
    assert float((prod - 1).abs().max()) <= 2.0**-23


def test_scale_saturates_and_keeps_eps():
    spec = mq.QuantSpec(torch.float8_e4m3fn, margin=127)
    s, _ = mq.calculate_qparams(torch.tensor(-3e38), torch.tensor(3e38), spec)
    assert float(s) == torch.finfo(torch.float32).max
    s, _ = mq.calculate_qparams(torch.tensor(0.0), torch.tensor(0.0), mq.QuantSpec(torch.float8_e4m3fn))
    assert float(s) == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_saturates_and_casts_as_tensor_to(dtype, xdtype):
    x = torch.cat(
        [torch.randn(3000) * 300, torch.tensor([1e6, -1e6, float("inf"), float("-inf"), 0.0, -0.0])]
    )
    x = torch.cat([x, torch.tensor([float("nan")])]).to(xdtype)
    scale = torch.tensor(0.75)
    q = mq.quantize(x, scale, None, dtype=dtype)
    assert q.dtype == dtype and q.shape == x.shape
    m = MAXES[dtype]
    want = (x.float() / scale).clamp(-m, m).to(dtype)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    back = mq.dequantize(q, scale, None)
    assert back.dtype == torch.float32 and torch.isnan(back[-1]) and float(back[-4]) == -m * 0.75
    assert float(back.abs().nan_to_num().max()) <= m * 0.75
    fq = mq.fake_quantize(x, scale, torch.tensor(0), dtype=dtype)
    torch.testing.assert_close(fq, back, rtol=0, atol=0, equal_nan=True)


def test_quantize_per_channel_fp8_and_integer_dtype_keyword():
    x = torch.randn(4, 6) * 10
    scale = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = mq.quantize(x, scale, None, ch_axis=0, dtype=torch.float8_e4m3fn)
    assert torch.equal(q.float(), (x / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    zp = torch.zeros(4, dtype=torch.int32)
    assert torch.equal(mq.quantize(x, scale, zp, ch_axis=0, dtype=torch.qint8),
                       mq.quantize(x, scale, zp, -128, 127, ch_axis=0))  # fmt: skip
    with pytest.raises(ValueError, match="either qmin/qmax or dtype"):
        mq.quantize(x, scale, zp, -128, 127, dtype=torch.qint8)
    with pytest.raises(ValueError, match="pass the integer range"):
        mq.quantize(x, scale, zp)
    db = mq.quantization_sqnr(x, *mq.calculate_qparams(x.min(), x.max(), mq.QuantSpec(torch.float8_e4m3fn)),
                              dtype=torch.float8_e4m3fn)  # fmt: skip
    assert 20 < float(db) < 60


OBSERVERS = [
    (mq.MinMaxObserver, {}),
    (mq.MovingAverageMinMaxObserver, {}),
    (mq.PerChannelMinMaxObserver, {"ch_axis": 1}),
    (mq.MovingAveragePerChannelMinMaxObserver, {"ch_axis": 1}),
    (mq.HistogramObserver, {"method": "mse", "bins": 256}),
    (mq.HistogramObserver, {"method": "percentile", "bins": 256}),
    (mq.AmaxHistoryObserver, {"history_len": 4}),
]


@pytest.mark.parametrize("cls, kwargs", OBSERVERS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2fnuz])
def test_every_observer_takes_fp8(cls, kwargs, dtype):
    obs = cls(dtype=dtype, margin=1, backend="torch", **kwargs)
    x = torch.randn(64, 16) * 5
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and not zp.any()
    assert bool((scale > 0).all())
    if cls in (mq.MinMaxObserver, mq.AmaxHistoryObserver):
        assert torch.equal(scale, x.abs().max() * 2 / MAXES[dtype])
    assert obs.settings()["margin"] == 1 and obs.settings()["qscheme"] == "symmetric"
    again = cls(**{**obs.settings(), "backend": "torch"})
    again.load_state_dict(obs.state_dict())
    assert "margin=1" in repr(obs)
    with pytest.raises(ValueError, match="margin: saved 1, here 0"):
        cls(**{**obs.settings(), "margin": 0}).load_state_dict(obs.state_dict())


def test_factory_passes_fp8_through():
    obs = mq.create_observer("per_channel", dtype=torch.float8_e5m2, ch_axis=0)
    assert obs.qscheme == "symmetric" and obs.spec.fp8_max == 57344.0
