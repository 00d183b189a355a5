"""Applying qparams to tensors: quantize, dequantize, fake-quantize, and the SQNR of the result.

Integer targets take ``qmin`` / ``qmax`` (``quant_range``) or ``dtype=``; FP8 targets ``dtype=`` (a float8
dtype of ``mono_quant.core.qparams``). Rounding is half to even, as torch's own quantize ops.
"""

from __future__ import annotations

import torch

from mono_quant.core.qparams import fp8_max, is_fp8, quant_range

__all__ = ["dequantize", "fake_quantize", "quantization_sqnr", "quantize", "sqnr"]

_F32_MAX = torch.finfo(torch.float32).max


def _broadcast(t: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if t.dim() == 0 or ch_axis is None:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def _target(qmin, qmax, dtype) -> tuple[int, int] | torch.dtype:
    """``(qmin, qmax)`` of an integer target, or the float8 dtype of an FP8 one.

    Raises:
        ValueError: neither or both of ``qmin``/``qmax`` and ``dtype``, or an unsupported ``dtype``.
    """
    if dtype is not None:
        if qmin is not None or qmax is not None:
            raise ValueError(
                f"pass either qmin/qmax or dtype, not both (got qmin={qmin}, qmax={qmax}, dtype={dtype})"
            )
        return dtype if is_fp8(dtype) else quant_range(dtype)
    if qmin is None or qmax is None:
        raise ValueError(
            "pass the integer range as qmin and qmax (quant_range(dtype)), or dtype= (integer or float8)"
        )
    return int(qmin), int(qmax)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int | None = None,
    qmax: int | None = None,
    ch_axis: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int32, or FP8 values.

    Rounding is half to even (``torch.round``, as ``torch.quantize_per_tensor``). ``+-inf`` and values far
    outside the range clamp to ``qmax`` / ``qmin``; ``NaN`` maps to the zero point (dequantizes to 0).
    FP8 (``dtype`` a float8 type): ``x / scale`` in float32 saturated to ``+-fp8_max`` and cast with
    ``Tensor.to(dtype)`` (round to nearest even); ``+-inf`` saturates, NaN stays NaN, the zero point is 0
    and not read (pass ``None`` or a zero tensor).

    Args:
        x: any float tensor.
        scale, zero_point: 0-d, or ``(C,)`` with ``ch_axis`` naming the channel dimension of ``x``.
        qmin, qmax: the integer range (``quant_range(dtype, reduce_range)``); or leave them out and pass
        dtype: an integer dtype (its full range) or a float8 dtype.
        ch_axis: the dimension of ``x`` that per-channel ``scale`` / ``zero_point`` run along.

    Returns:
        int32 codes shaped like ``x``; for FP8, a tensor of that float8 dtype.

    Raises:
        ValueError: neither or both of ``qmin``/``qmax`` and ``dtype``.
    """
    target = _target(qmin, qmax, dtype)
    s = _broadcast(scale.to(torch.float32), x, ch_axis)
    if isinstance(target, torch.dtype):
        m = fp8_max(target)
        return (x.to(torch.float32) / s).clamp(-m, m).to(target)
    qmin, qmax = target
    z = _broadcast(zero_point.to(torch.int32), x, ch_axis).to(torch.float32)
    # clamp in float before the integer cast: casting inf or |v| >= 2**63 to int64 is undefined
    # (it gives INT64_MIN on x86, which clamped to qmin); integers below 2**24 are exact in float32
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    q = torch.where(torch.isnan(q), z, q)
    return q.to(torch.int32)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, ch_axis: int | None = None
) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale`` of integer codes ``q`` (FP8 ``q``: ``q * scale``, the zero
    point not read).

    Finite for finite qparams: a product past the float32 range (a range that reaches the float32 limit
    puts its end codes there after rounding) saturates to ``+-max`` instead of becoming ``+-inf``. FP8 NaN
    stays NaN.
    """
    s = _broadcast(scale.to(torch.float32), q, ch_axis)
    if is_fp8(q.dtype):
        return (q.to(torch.float32) * s).clamp_(-_F32_MAX, _F32_MAX)
    z = _broadcast(zero_point.to(torch.int32), q, ch_axis)
    out = (q.to(torch.int32) - z).to(torch.float32) * s
    return out.clamp_(-_F32_MAX, _F32_MAX)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int | None = None,
    qmax: int | None = None,
    ch_axis: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))``: what the network sees after quantization, as float32 (arguments as for
    ``quantize``; for the module used in training, with gradients, see ``mono_quant.FakeQuantize``)."""
    q = quantize(x, scale, zero_point, qmin, qmax, ch_axis, dtype=dtype)
    return dequantize(q, scale, zero_point, ch_axis)


def sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Signal-to-quantization-noise ratio in dB: ``10 * log10(sum(x^2) / sum((x - x_hat)^2))``.

    Computed in float64 over the finite entries of ``x``; ``inf`` when the two are equal there (also for
    an all-zero signal), ``-inf`` for an all-zero signal with non-zero noise. Returns a 0-d float64 tensor.
    """
    x = x.detach().to(torch.float64)
    x_hat = x_hat.detach().to(torch.float64)
    finite = torch.isfinite(x)
    signal = torch.where(finite, x, 0).square().sum()
    noise = torch.where(finite, x - x_hat, 0).square().sum()
    db = 10 * torch.log10(signal / noise)
    return torch.where(noise == 0, torch.full_like(db, float("inf")), db)  # 0 / 0 would be NaN


def quantization_sqnr(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int | None = None,
    qmax: int | None = None,
    ch_axis: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """SQNR (dB) of ``x`` fake-quantized with the given qparams: ``sqnr(x, fake_quantize(x, ...))``.

    How much of a tensor survives quantization with an observer's ``calculate_qparams()``: higher is
    better; each extra bit of a well-chosen range adds about 6 dB.

    Args:
        x: float tensor, e.g. a layer's input activations ``(..., C)``.
        scale, zero_point: 0-d, or ``(C,)`` with ``ch_axis`` naming the channel dimension of ``x``.
        qmin, qmax: the integer range (``quant_range(dtype, reduce_range)`` or ``QuantSpec.qmin/qmax``); or
        dtype: instead of ``qmin`` / ``qmax``, an integer or float8 dtype (as for ``quantize``).
        ch_axis: the dimension of ``x`` that per-channel qparams run along.

    Returns:
        0-d float64 tensor (see ``sqnr`` for the ``inf`` cases).
    """
    return sqnr(x, fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis, dtype=dtype))
