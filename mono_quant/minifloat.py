"""The small number formats of block quantization, in plain float32 arithmetic: elements and scales.

Elements: FP8 ``e4m3`` (OCP ``E4M3``, torch's ``float8_e4m3fn``: no infinities), FP8 ``e5m2`` and FP4
``e2m1`` (OCP MX v1.0). Scales: ``e8m0`` (a biased power of two, OCP MX) and ``e4m3`` (NVFP4's block scale).
This module is the arithmetic only; ``mono_quant.core.formats`` defines the block formats built from it.

Every function works on float32 tensors with a handful of exact operations (integer views of the bits,
one float32 add/sub pair, comparisons), the same operations the Triton kernels of ``kernels/blocks.py``
perform, so both give the same bits on every backend:

- Rounding to an element format is round-to-nearest-even with saturation: finite values beyond the
  largest magnitude and +-Inf become +-max, NaN stays NaN, signed zeros keep their sign. The result is a
  float32 holding a value of the format exactly, so a cast to torch's float8 dtypes is exact.
- ``e8m0`` codes: byte ``s`` stands for ``2**(s - 127)``, ``s = 255`` for NaN (OCP MX 5.4.1); code 0 is the
  float32 subnormal ``2**-127``.

Imports torch only (it sits below ``mono_quant.reference``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "E2M1",
    "E4M3",
    "E5M2",
    "E8M0_NAN",
    "Minifloat",
    "decode_e2m1",
    "e2m1_codes",
    "e8m0_from_amax",
    "e8m0_reciprocal",
    "e8m0_value",
    "pack_fp4",
    "round_to_element",
    "unpack_fp4",
]


class Minifloat(NamedTuple):
    """An element format: ``mbits`` mantissa bits, smallest normal exponent ``emin``, largest value ``max``,
    and ``emax``, the exponent of the largest power of two it holds (OCP's ``emax_elem``)."""

    name: str
    mbits: int
    emin: int
    emax: int
    max: float


E4M3 = Minifloat("e4m3", mbits=3, emin=-6, emax=8, max=448.0)  # float8_e4m3fn: S.1111.111 is NaN
E5M2 = Minifloat("e5m2", mbits=2, emin=-14, emax=15, max=57344.0)  # IEEE-like; Inf saturates here
E2M1 = Minifloat("e2m1", mbits=1, emin=0, emax=2, max=6.0)  # values 0, 0.5, 1, 1.5, 2, 3, 4, 6
E8M0_NAN = 255
_SIGN = -0x80000000  # int32 0x80000000
_E8M0_MIN_BITS = 0x00400000  # float32 bits of 2**-127, the value of e8m0 code 0


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def round_to_element(v: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """``v`` rounded to the nearest value of ``fmt`` (ties to even), saturating; as float32.

    ``|v|`` is clamped to ``fmt.max`` (Inf too), then rounded by adding and subtracting the power of two
    ``m = 2**(max(e, emin) + 23 - mbits)``, ``e`` the exponent of ``|v|``: the float32 sum has the
    spacing of ``fmt`` at ``|v|`` (of its subnormals below ``2**emin``), so the add rounds to nearest even
    on ``fmt``'s grid and the subtraction is exact. The sign (zeros too) is kept; NaN stays NaN (it
    passes through the float ops). No select: on the CPU ``torch.where`` is ten times slower than an add.

    Args:
        v: float32 tensor of any shape.

    Returns:
        float32, the shape of ``v``.
    """
    a = v.abs().clamp_(max=fmt.max)
    exp = (_bits(a) >> 23).clamp_(min=fmt.emin + 127)
    magic = exp.add_(23 - fmt.mbits).bitwise_left_shift_(23).view(torch.float32)
    r = (a + magic).sub_(magic)
    return _bits(r).bitwise_or_(_bits(v) & _SIGN).view(torch.float32)


def e2m1_codes(r: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (uint8, ``0..15``, sign in bit 3) of float32 values of ``E2M1`` (``round_to_element``).

    NaN has no e2m1 code: it encodes as +0 (a NaN block is marked by its scale).
    """
    b = _bits(r)
    a = r.abs()
    exp = (_bits(a) >> 23) - 126  # 1 for [1, 2), 2 for [2, 4), 3 for [4, 8)
    normal = (exp << 1) | ((_bits(a) >> 22) & 1)
    code = torch.where(a < 1.0, (a * 2.0).to(torch.int32), normal)
    code = torch.where(torch.isnan(r), 0, code | ((b >> 28) & 8))
    return code.to(torch.uint8)


_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit e2m1 codes (uint8 ``0..15``; higher bits are ignored)."""
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[(codes & 15).long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, low nibble first: byte ``j`` of a row holds elements ``2j`` (bits 0-3)
    and ``2j + 1`` (bits 4-7), torchao's and the OCP MX layout.

    Args:
        codes: uint8 ``(..., C)`` with ``C`` even.

    Returns:
        uint8 ``(..., C // 2)``.

    Raises:
        ValueError: ``C`` is odd.
    """
    if codes.shape[-1] % 2:
        raise ValueError(
            f"packed FP4 holds two values per byte along the last dimension, which must be even; got "
            f"shape {tuple(codes.shape)} (quantize with packed=False for unpacked values)"
        )
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """The codes ``pack_fp4`` packed: uint8 ``(..., 2 * C)`` from uint8 ``(..., C)``."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)


def e8m0_from_amax(amax: torch.Tensor, elem: Minifloat, rounding: str) -> torch.Tensor:
    """OCP MX scale codes (uint8) of blocks whose absolute maximum is ``amax`` (float32).

    ``"floor"`` (OCP MX v1.0, torchao ``FLOOR``): ``2**(floor(log2(amax)) - emax_elem)``, the exponent read
    from the float32 bits (0 and subnormal amaxes count as ``2**-127``), clamped to ``[2**-127, 2**127]``;
    a NaN or Inf amax gives NaN (255).

    ``"rceil"`` (NVIDIA's rule, torchao ``RCEIL``, PTX ``cvt.rp.satfinite.ue8m0x2.f32``): ``amax / max_elem``
    in float32, rounded up to a power of two, at least ``2**-127`` and at most ``2**127`` (+Inf too); NaN
    gives NaN.

    Args:
        amax: float32, any shape, non-negative or NaN / Inf.

    Returns:
        uint8 codes, the shape of ``amax``.
    """
    if rounding == "floor":
        exp = ((_bits(amax) >> 23) & 0xFF) - 127
        code = torch.clamp(exp - elem.emax, -127, 127) + 127
        return torch.where(torch.isfinite(amax), code, E8M0_NAN).to(torch.uint8)
    d = amax / elem.max
    b = _bits(d)
    exp, man = (b >> 23) & 0xFF, b & 0x7FFFFF
    up = torch.where(exp == 0, man > 0x400000, man != 0)
    code = torch.clamp(exp + up.to(torch.int32), max=254)
    return torch.where(torch.isnan(d), E8M0_NAN, code).to(torch.uint8)


def e8m0_value(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(s - 127)`` of e8m0 codes (uint8); code 0 is ``2**-127``, 255 is NaN."""
    s = codes.to(torch.int32)
    b = torch.where(s == 0, _E8M0_MIN_BITS, s << 23)
    return torch.where(s == E8M0_NAN, float("nan"), b.view(torch.float32))


def e8m0_reciprocal(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(127 - s)``, the exact reciprocal of ``e8m0_value`` (NaN for 255)."""
    r = 254 - codes.to(torch.int32)
    b = torch.where(r == 0, _E8M0_MIN_BITS, r << 23)
    return torch.where(r < 0, float("nan"), b.view(torch.float32))
