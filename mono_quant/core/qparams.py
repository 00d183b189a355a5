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

FP8 (``torch.float8_e4m3fn`` / ``float8_e5m2`` / ``float8_e4m3fnuz`` / ``float8_e5m2fnuz``, largest finite
values ``fp8_max`` 448 / 57344 / 240 / 57344) is symmetric, with a ``margin`` of powers of two kept free::

    amax       = max(-min_neg, max_pos)            # of the finite values
    scale      = clamp(amax * 2**margin / fp8_max, eps, float32 max)
    zero_point = 0

in float32 (where ``amax * 2**margin`` overflows, ``amax / fp8_max * 2**margin``: the same value when it is
finite). FP8 quantization is ``x / scale`` saturated to ``+-fp8_max``, then the round-to-nearest-even cast of
``Tensor.to(float8)``; NaN stays NaN. The scale is the reciprocal of torchao's float8 scale
(``amax_to_scale`` returns ``fp8_max / amax``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FP8_DTYPES",
    "INTEGER_DTYPES",
    "QuantSpec",
    "SUPPORTED_DTYPES",
    "calculate_qparams",
    "dtype_from_name",
    "dtype_name",
    "fp8_max",
    "is_fp8",
    "quant_range",
    "resolve_qscheme",
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

INTEGER_DTYPES: tuple[torch.dtype, ...] = tuple(_RANGES)

# float8 dtype -> largest finite value (torch.finfo(dtype).max), smallest normal exponent, mantissa bits
_FP8: dict[torch.dtype, tuple[float, int, int]] = {}
for _name, _fmt in (
    ("float8_e4m3fn", (448.0, -6, 3)),
    ("float8_e5m2", (57344.0, -14, 2)),
    ("float8_e4m3fnuz", (240.0, -7, 3)),
    ("float8_e5m2fnuz", (57344.0, -15, 2)),
):
    if hasattr(torch, _name):
        _FP8[getattr(torch, _name)] = _fmt
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(_FP8)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = INTEGER_DTYPES + FP8_DTYPES
# the short names of the CLI (``--dtype fp8_e4m3``), accepted by dtype_from_name
_FP8_ALIASES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "fp8_e4m3fnuz": "float8_e4m3fnuz",
                "fp8_e5m2fnuz": "float8_e5m2fnuz"}  # fmt: skip


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the float8 ``FP8_DTYPES``."""
    return dtype in _FP8


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of a float8 dtype (448, 57344, 240, 57344).

    Raises:
        ValueError: ``dtype`` is not one of ``FP8_DTYPES``.
    """
    if dtype not in _FP8:
        names = ", ".join(str(d) for d in FP8_DTYPES)
        raise ValueError(f"dtype={dtype} is not a float8 dtype; use one of: {names}")
    return _FP8[dtype][0]


def fp8_format(dtype: torch.dtype) -> tuple[float, int, int]:
    """``(fp8_max, smallest normal exponent, mantissa bits)`` of a float8 dtype (the kernels' rounding)."""
    fp8_max(dtype)
    return _FP8[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``"qint8"``, ``"int4"``, ``"float8_e4m3fn"``, ...: how saved files name a quantized dtype."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The quantized dtype a saved file names (``dtype_name``; ``"fp8_e4m3"`` and the other short FP8 names
    of the CLI are accepted too).

    Raises:
        ValueError: not the name of one of ``SUPPORTED_DTYPES``.
    """
    name = _FP8_ALIASES.get(name, name)
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
        ValueError: for a dtype that is not one of ``INTEGER_DTYPES`` (FP8 has no integer range: see
            ``fp8_max``).
    """
    if dtype in _FP8:
        raise ValueError(
            f"dtype={dtype} is a float8 dtype and has no integer range; use fp8_max({dtype}) or pass "
            "dtype= to quantize / dequantize / fake_quantize"
        )
    if dtype not in _RANGES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"dtype={dtype} is not a supported quantized dtype; use one of: {names}")
    qmin, qmax = _RANGES[dtype]
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2  # floor halving: -128 -> -64, 127 -> 63, 255 -> 127
    return qmin, qmax


_F32_MAX = torch.finfo(torch.float32).max


def _check_margin(margin) -> int:
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 127:
        raise ValueError(
            f"margin={margin!r} must be an int from 0 to 127 (the scale is multiplied by 2**margin, a float)"
        )
    return margin


@dataclass(frozen=True)
class QuantSpec:
    """What turns a range into qparams: dtype, scheme, range reduction, the smallest scale and the FP8 margin.

    Args:
        dtype: one of ``SUPPORTED_DTYPES``: the integer types or the float8 types.
        qscheme: ``"affine"`` / ``"symmetric"`` (or a ``torch.per_*`` constant); ``None`` (default): affine
            for the integer types, symmetric for FP8.
        reduce_range: drop one bit of the integer range (integer types only).
        eps: the smallest scale, a normal float32.
        margin: FP8 only: the scale is ``2**margin`` times the one that maps ``amax`` to ``fp8_max``
            (TransformerEngine's margin), an int from 0 to 127.

    Raises:
        ValueError: an unsupported dtype, qscheme or eps; an affine, ``reduce_range`` or bad ``margin`` FP8
            spec; a ``margin`` other than 0 for an integer type.
    """

    dtype: torch.dtype = torch.qint8
    qscheme: str | None = None
    reduce_range: bool = False
    eps: float = torch.finfo(torch.float32).eps
    margin: int = 0

    def __post_init__(self):
        if self.dtype not in _FP8:
            quant_range(self.dtype)  # validates the dtype
        fp8 = self.dtype in _FP8
        qscheme = ("symmetric" if fp8 else "affine") if self.qscheme is None else self.qscheme
        object.__setattr__(self, "qscheme", resolve_qscheme(qscheme))
        if fp8 and self.qscheme == "affine":
            raise ValueError(
                f"qscheme={self.qscheme!r} with dtype={self.dtype}: FP8 quantization is symmetric "
                "(zero point 0); use qscheme='symmetric' or leave qscheme unset"
            )
        if fp8 and self.reduce_range:
            raise ValueError(
                f"reduce_range=True drops a bit of an integer range; dtype={self.dtype} has none"
            )
        _check_margin(self.margin)
        if not fp8 and self.margin != 0:
            raise ValueError(
                f"margin={self.margin!r} is for the FP8 dtypes; dtype={self.dtype} takes margin=0"
            )
        # the smallest scale must itself be a usable float32 scale: positive, normal and finite
        eps, tiny, big = self.eps, torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not tiny <= eps <= big:
            raise ValueError(
                f"eps={eps!r} must be a number from {tiny:.4g} (the smallest normal float32) to {big:.4g}"
            )

    @property
    def is_fp8(self) -> bool:
        return self.dtype in _FP8

    @property
    def fp8_max(self) -> float:
        """The largest finite value of the FP8 dtype (``ValueError`` for an integer one)."""
        return fp8_max(self.dtype)

    @property
    def qmin(self) -> int:
        return quant_range(self.dtype, self.reduce_range)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.dtype, self.reduce_range)[1]

    @property
    def levels(self) -> int:
        """Values the target can hold: ``qmax - qmin + 1``; for FP8 its finite values (the histogram searches
        model them as that many evenly spaced levels: an approximation, FP8 spacing grows with magnitude)."""
        if self.is_fp8:
            return _fp8_levels(self.dtype)
        return self.qmax - self.qmin + 1

    @property
    def signed(self) -> bool:
        return self.is_fp8 or quant_range(self.dtype)[0] < 0


def _fp8_levels(dtype: torch.dtype) -> int:
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return int(torch.unique(values[torch.isfinite(values)]).numel())


def fp8_scale(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``clamp(amax * 2**margin / fp8_max, eps, float32 max)`` in float32 (see the module docstring).

    Args:
        amax: float32 tensor of any shape, ``>= 0``.
        spec: an FP8 spec.

    Returns:
        float32 scales shaped like ``amax``.
    """
    m, f = float(2**spec.margin), spec.fp8_max
    scale = amax * m / f
    scale = torch.where(torch.isinf(scale), amax / f * m, scale)
    return scale.clamp(min=spec.eps, max=_F32_MAX)


def calculate_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range ``[min_val, max_val]`` (see the module docstring).

    Args:
        min_val, max_val: float tensors of one shape: ``()`` per tensor, ``(C,)`` per channel.
        spec: dtype, qscheme, reduce_range, eps, margin.

    Returns:
        ``(scale, zero_point)``: float32 and int32, shaped like ``min_val``, on its device.
    """
    min_val = min_val.to(torch.float32)
    max_val = max_val.to(torch.float32)
    zero = torch.zeros_like(min_val)
    min_neg = torch.minimum(min_val, zero)
    max_pos = torch.maximum(max_val, zero)
    if spec.is_fp8:
        scale = fp8_scale(torch.maximum(-min_neg, max_pos), spec)
        return scale, torch.zeros_like(min_val, dtype=torch.int32)
    qmin, qmax = spec.qmin, spec.qmax
    # a fill, not a copy from the host: no synchronization, and CUDA-graph capturable (FakeQuantize)
    eps = torch.full((), spec.eps, dtype=torch.float32, device=min_val.device)
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
