"""Quantization parameters from a range: pure functions shared by every observer.

Integer range of each dtype (``reduce_range`` drops one bit, as torch.ao does for 8-bit types;
mono_quant applies the same rule to the 4-bit types)::

    qint8 / int8     [-128, 127]     reduce_range: [-64, 63]
    quint8 / uint8   [0, 255]        reduce_range: [0, 127]
    int4             [-8, 7]         reduce_range: [-4, 3]
    uint4            [0, 15]         reduce_range: [0, 7]

From a range ``[min_val, max_val]`` (per tensor, or elementwise per channel)::

    min_neg = min(min_val, 0)          # the range always contains 0, so 0 is exactly representable
    max_pos = max(max_val, 0)

    affine:     scale      = max(eps, (max_pos - min_neg) / (qmax - qmin))
                zero_point = clamp(qmin - round(min_neg / scale), qmin, qmax)
    symmetric:  scale      = max(eps, max(-min_neg, max_pos) / ((qmax - qmin) / 2))
                zero_point = 0 for signed types; for unsigned ones the middle of the range,
                (qmax - qmin + 1) // 2: 128 for uint8 (64 with reduce_range), 8 for uint4

All arithmetic is float32 in this order, so for the 8-bit types the result is bit-identical to
``torch.ao.quantization``'s observers for the same min/max, dtype, qscheme, reduce_range and eps.
Deliberate differences: per-tensor results are 0-d (torch.ao returns shape ``(1,)``); a range wider
than float32 can hold (``max_pos - min_neg`` overflows near 3.4e38) is divided before it is subtracted,
so the scale stays finite; zero points are always int32; and symmetric unsigned with ``reduce_range``,
which torch.ao refuses, is allowed. A constant input gives ``scale = eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantSpec",
    "SUPPORTED_DTYPES",
    "calculate_qparams",
    "dequantize",
    "dtype_from_name",
    "dtype_name",
    "fake_quantize",
    "quant_range",
    "quantization_sqnr",
    "quantize",
    "resolve_qscheme",
    "sqnr",
]

# dtype -> (qmin, qmax, signed); torch.int4 / torch.uint4 exist from torch 2.3 on.
_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.qint8: (-128, 127),
    torch.int8: (-128, 127),
    torch.quint8: (0, 255),
    torch.uint8: (0, 255),
}
for _name, _rng in (("int4", (-8, 7)), ("uint4", (0, 15))):
    if hasattr(torch, _name):
        _RANGES[getattr(torch, _name)] = _rng

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_RANGES)


def dtype_name(dtype: torch.dtype) -> str:
    """``"qint8"``, ``"int4"``, ...: how saved files name a quantized dtype."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The quantized dtype a saved file names (``dtype_name``).

    Raises:
        ValueError: not the name of one of ``SUPPORTED_DTYPES``.
    """
    for dtype in SUPPORTED_DTYPES:
        if dtype_name(dtype) == name:
            return dtype
    names = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
    raise ValueError(f"dtype {name!r} is not a supported quantized dtype; use one of: {names}")


_QSCHEMES = {
    "affine": "affine",
    "symmetric": "symmetric",
    torch.per_tensor_affine: "affine",
    torch.per_channel_affine: "affine",
    torch.per_tensor_symmetric: "symmetric",
    torch.per_channel_symmetric: "symmetric",
}


def resolve_qscheme(qscheme) -> str:
    """``"affine"`` / ``"symmetric"`` from a string or a ``torch.per_*`` constant.

    Raises:
        ValueError: for any other value, listing the accepted ones.
    """
    key = qscheme.lower() if isinstance(qscheme, str) else qscheme
    try:
        return _QSCHEMES[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"qscheme={qscheme!r} is not supported; use 'affine' or 'symmetric' "
            "(torch.per_tensor_affine/symmetric and torch.per_channel_affine/symmetric are accepted too)"
        ) from None


def quant_range(dtype: torch.dtype, reduce_range: bool = False) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of a quantized dtype.

    Raises:
        ValueError: for a dtype that is not one of ``SUPPORTED_DTYPES``.
    """
    if dtype not in _RANGES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"dtype={dtype} is not a supported quantized dtype; use one of: {names}")
    qmin, qmax = _RANGES[dtype]
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2  # floor halving: -128 -> -64, 127 -> 63, 255 -> 127
    return qmin, qmax


@dataclass(frozen=True)
class QuantSpec:
    """What turns a range into qparams: dtype, scheme, range reduction and the smallest scale."""

    dtype: torch.dtype = torch.qint8
    qscheme: str = "affine"
    reduce_range: bool = False
    eps: float = torch.finfo(torch.float32).eps

    def __post_init__(self):
        quant_range(self.dtype)  # validates the dtype
        object.__setattr__(self, "qscheme", resolve_qscheme(self.qscheme))
        # the smallest scale must itself be a usable float32 scale: positive, normal and finite
        eps, tiny, big = self.eps, torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not tiny <= eps <= big:
            raise ValueError(
                f"eps={eps!r} must be a number from {tiny:.4g} (the smallest normal float32) to {big:.4g}"
            )

    @property
    def qmin(self) -> int:
        return quant_range(self.dtype, self.reduce_range)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.dtype, self.reduce_range)[1]

    @property
    def signed(self) -> bool:
        return quant_range(self.dtype)[0] < 0


def calculate_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range ``[min_val, max_val]`` (see the module docstring).

    Args:
        min_val, max_val: float tensors of one shape: ``()`` per tensor, ``(C,)`` per channel.
        spec: dtype, qscheme, reduce_range, eps.

    Returns:
        ``(scale, zero_point)``: float32 and int32, shaped like ``min_val``, on its device.
    """
    qmin, qmax = spec.qmin, spec.qmax
    min_val = min_val.to(torch.float32)
    max_val = max_val.to(torch.float32)
    zero = torch.zeros_like(min_val)
    min_neg = torch.minimum(min_val, zero)
    max_pos = torch.maximum(max_val, zero)
    eps = torch.tensor(spec.eps, dtype=torch.float32, device=min_val.device)
    if spec.qscheme == "symmetric":
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.maximum(amax / (float(qmax - qmin) / 2), eps)
        zp = 0 if spec.signed else (qmax - qmin + 1) // 2
        zero_point = torch.full_like(min_val, zp, dtype=torch.int32)
        return scale, zero_point
    levels = float(qmax - qmin)
    scale = (max_pos - min_neg) / levels
    # Near the float32 limit the difference overflows; dividing first keeps it finite.
    scale = torch.where(torch.isinf(scale), max_pos / levels - min_neg / levels, scale)
    scale = torch.maximum(scale, eps)
    zero_point = qmin - torch.round(min_neg / scale).to(torch.int32)
    return scale, torch.clamp(zero_point, qmin, qmax).to(torch.int32)


def _broadcast(t: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if t.dim() == 0 or ch_axis is None:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int32.

    Rounding is half to even (``torch.round``, as ``torch.quantize_per_tensor``). ``+-inf`` and values far
    outside the range clamp to ``qmax`` / ``qmin``; ``NaN`` maps to the zero point (dequantizes to 0).

    Args:
        x: any float tensor.
        scale, zero_point: 0-d, or ``(C,)`` with ``ch_axis`` naming the channel dimension of ``x``.
        qmin, qmax: the integer range (``quant_range(dtype, reduce_range)``).
        ch_axis: the dimension of ``x`` that per-channel ``scale`` / ``zero_point`` run along.

    Returns:
        int32 codes shaped like ``x``.
    """
    s = _broadcast(scale.to(torch.float32), x, ch_axis)
    z = _broadcast(zero_point.to(torch.int32), x, ch_axis).to(torch.float32)
    # clamp in float before the integer cast: casting inf or |v| >= 2**63 to int64 is undefined
    # (it gives INT64_MIN on x86, which clamped to qmin); integers below 2**24 are exact in float32
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    q = torch.where(torch.isnan(q), z, q)
    return q.to(torch.int32)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, ch_axis: int | None = None
) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale`` of integer codes ``q``.

    Finite for finite qparams: a product past the float32 range (a range that reaches the float32 limit
    puts its end codes there after rounding) saturates to ``+-max`` instead of becoming ``+-inf``.
    """
    s = _broadcast(scale.to(torch.float32), q, ch_axis)
    z = _broadcast(zero_point.to(torch.int32), q, ch_axis)
    out = (q.to(torch.int32) - z).to(torch.float32) * s
    big = torch.finfo(torch.float32).max
    return out.clamp_(-big, big)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))``: what the network sees after quantization, as float32."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, ch_axis), scale, zero_point, ch_axis)


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
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """SQNR (dB) of ``x`` fake-quantized with the given qparams: ``sqnr(x, fake_quantize(x, ...))``.

    How much of a tensor survives quantization with an observer's ``calculate_qparams()``: higher is
    better; each extra bit of a well-chosen range adds about 6 dB.

    Args:
        x: float tensor, e.g. a layer's input activations ``(..., C)``.
        scale, zero_point: 0-d, or ``(C,)`` with ``ch_axis`` naming the channel dimension of ``x``.
        qmin, qmax: the integer range (``quant_range(dtype, reduce_range)`` or ``QuantSpec.qmin/qmax``).
        ch_axis: the dimension of ``x`` that per-channel qparams run along.

    Returns:
        0-d float64 tensor (see ``sqnr`` for the ``inf`` cases).
    """
    return sqnr(x, fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis))
