"""The quantization-parameter contract: torch.ao parity for 8-bit types, int4 ranges, edge cases."""

import warnings

import pytest
import torch

from mono_quant.core.qparams import QuantSpec, calculate_qparams, quant_range, resolve_qscheme


def _torch_ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import observer
        except ImportError:
            pytest.skip("torch.ao.quantization is not importable in this torch build")
    return observer


EIGHT_BIT = [torch.qint8, torch.quint8, torch.int8, torch.uint8]
AO_DTYPE = {torch.int8: torch.qint8, torch.uint8: torch.quint8}


def _ranges():
    g = torch.Generator().manual_seed(1)
    lo = -torch.rand(200, generator=g) * torch.logspace(-6, 6, 200)
    hi = torch.rand(200, generator=g) * torch.logspace(6, -6, 200)
    lo[::7] = 0.0  # non-negative data
    hi[::11] = 0.0  # non-positive data
    lo[5], hi[5] = 0.25, 0.25  # constant input
    lo[6], hi[6] = 3.0, 7.0  # range not containing zero
    lo[8], hi[8] = -9.0, -2.0
    return lo, hi


@pytest.mark.parametrize("dtype", EIGHT_BIT)
@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("eps", [torch.finfo(torch.float32).eps, 1e-3])
def test_bit_identical_to_torch_ao(dtype, qscheme, reduce_range, eps):
    obs_mod = _torch_ao()
    ao_scheme = torch.per_tensor_affine if qscheme == "affine" else torch.per_tensor_symmetric
    spec = QuantSpec(dtype, qscheme, reduce_range, eps)
    ao_kwargs = dict(dtype=AO_DTYPE.get(dtype, dtype), qscheme=ao_scheme, reduce_range=reduce_range, eps=eps)
    if qscheme == "symmetric" and reduce_range and not spec.signed:
        # torch.ao refuses this combination; mono_quant centres the zero point in [0, 127]
        with pytest.raises(NotImplementedError):
            obs_mod.MinMaxObserver(**ao_kwargs)
        _, zp = calculate_qparams(torch.tensor(-1.0), torch.tensor(2.0), spec)
        assert int(zp) == 64
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao warns that reduce_range will be deprecated
        ao = obs_mod.MinMaxObserver(**ao_kwargs)
    lo, hi = _ranges()
    for a, b in zip(lo, hi):
        want_s, want_z = ao._calculate_qparams(a, b)
        got_s, got_z = calculate_qparams(a, b, spec)
        assert got_s.shape == () and got_z.shape == ()
        assert got_s.dtype == torch.float32 and got_z.dtype == torch.int32
        assert torch.equal(got_s, want_s.reshape(())), (a, b)
        assert int(got_z) == int(want_z), (a, b)


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_per_channel_matches_torch_ao(qscheme):
    obs_mod = _torch_ao()
    ao_scheme = torch.per_channel_affine if qscheme == "affine" else torch.per_channel_symmetric
    ao = obs_mod.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=ao_scheme)
    lo, hi = _ranges()
    want_s, want_z = ao._calculate_qparams(lo, hi)
    got_s, got_z = calculate_qparams(lo, hi, QuantSpec(torch.qint8, qscheme))
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_z, want_z.to(torch.int32))


def test_quant_ranges():
    assert quant_range(torch.qint8) == (-128, 127)
    assert quant_range(torch.qint8, True) == (-64, 63)
    assert quant_range(torch.quint8, True) == (0, 127)
    assert quant_range(torch.int4) == (-8, 7)
    assert quant_range(torch.uint4) == (0, 15)
    assert quant_range(torch.int4, True) == (-4, 3)
    assert quant_range(torch.uint4, True) == (0, 7)


@pytest.mark.parametrize("dtype", [torch.int4, torch.uint4])
def test_int4_uses_its_range(dtype):
    qmin, qmax = quant_range(dtype)
    scale, zp = calculate_qparams(torch.tensor(-3.0), torch.tensor(12.0), QuantSpec(dtype, "affine"))
    assert scale == pytest.approx(15.0 / (qmax - qmin))
    assert qmin <= int(zp) <= qmax
    # the range maps onto [qmin, qmax]: min -> qmin, max -> qmax (up to rounding of the zero point)
    assert round(-3.0 / float(scale)) + int(zp) == qmin
    s_sym, z_sym = calculate_qparams(torch.tensor(-3.0), torch.tensor(12.0), QuantSpec(dtype, "symmetric"))
    assert s_sym == pytest.approx(12.0 / ((qmax - qmin) / 2))
    assert int(z_sym) == (0 if qmin < 0 else 8)


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_range_includes_zero_and_zero_is_exact(qscheme):
    spec = QuantSpec(torch.quint8, qscheme)
    for lo, hi in [(0.5, 3.0), (-4.0, -1.0), (-2.0, 5.0)]:
        scale, zp = calculate_qparams(torch.tensor(lo), torch.tensor(hi), spec)
        # zero quantizes to the zero point and back to exactly zero
        q = torch.clamp(torch.round(torch.tensor(0.0) / scale) + zp, spec.qmin, spec.qmax)
        assert float((q - zp) * scale) == 0.0


def test_constant_input_gives_positive_scale():
    for v in [0.0, 1.0, -2.5, 1e-30]:
        scale, zp = calculate_qparams(torch.tensor(v), torch.tensor(v), QuantSpec())
        assert float(scale) > 0 and torch.isfinite(scale)


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_float32_limit_gives_finite_scale(qscheme):
    big = torch.finfo(torch.float32).max
    scale, zp = calculate_qparams(torch.tensor(-big), torch.tensor(big), QuantSpec(torch.qint8, qscheme))
    assert torch.isfinite(scale) and float(scale) > 0
    assert -128 <= int(zp) <= 127


def test_bad_dtype_and_qscheme():
    with pytest.raises(ValueError, match="torch.float32"):
        QuantSpec(dtype=torch.float32)
    with pytest.raises(ValueError, match="'affine' or 'symmetric'"):
        QuantSpec(qscheme="asymmetric")
    with pytest.raises(ValueError, match="eps"):
        QuantSpec(eps=0)
    assert resolve_qscheme(torch.per_channel_symmetric) == "symmetric"
    assert resolve_qscheme("AFFINE") == "affine"


@pytest.mark.parametrize(
    "eps", [1e-50, 1e-40, float("inf"), 1e39, float("nan"), -1.0, 0.0, True, "1e-3", None]
)
def test_eps_that_cannot_be_a_float32_scale_is_refused(eps):
    # 1e-50 rounds to 0 in float32 (scale 0), 1e39 and inf to inf, 1e-40 is subnormal, True is not a number
    with pytest.raises(ValueError, match=r"eps=.* must be a number from 1.175e-38"):
        QuantSpec(eps=eps)


@pytest.mark.parametrize("eps", [1.2e-38, 1e-30, 1e-3, 1.0, 3e38])
def test_eps_in_range_gives_a_finite_positive_scale(eps):
    spec = QuantSpec(eps=eps)
    scale, _ = calculate_qparams(torch.tensor(0.0), torch.tensor(0.0), spec)
    assert torch.isfinite(scale) and float(scale) > 0
