"""Block-scaled formats: MXFP8 / MXFP4 (OCP MX v1.0), NVFP4 and 128-blocked FP8, each defined once here.

A block format stores a tensor as small elements plus one scale per block. ``FORMATS`` holds them:

============== ======= ========================= ============= =========================================
name           element block                     block scale   scale rule (float32 arithmetic)
============== ======= ========================= ============= =========================================
``mxfp8_e4m3`` e4m3    (1, 32)                   e8m0          ``2**(floor(log2(amax)) - 8)``
``mxfp8_e5m2`` e5m2    (1, 32)                   e8m0          ``2**(floor(log2(amax)) - 15)``
``mxfp4_e2m1`` e2m1    (1, 32)                   e8m0          ``2**(floor(log2(amax)) - 2)``
``nvfp4``      e2m1    (1, 16)                   e4m3, + fp32  ``e4m3(amax / 6 / t)``, ``t = amax_tensor
                                                 per tensor    / (448 * 6)``
``fp8_block``  e4m3    (1, 128) act, (128, 128)  fp32          ``amax / 448``
                       weights
============== ======= ========================= ============= =========================================

Rounding rules:

- MX (``rounding="floor"``, the default, OCP MX v1.0 6.3 and torchao's ``FLOOR``): the exponent of the
  block amax read from its float32 bits (0 and subnormal amaxes count as ``2**-127``) minus ``emax_elem``
  (8 / 15 / 2), clamped to the E8M0 range ``[2**-127, 2**127]``; NaN or Inf in a block gives the NaN scale
  (code 255). ``rounding="rceil"`` (NVIDIA's libraries, torchao's ``RCEIL``, PTX
  ``cvt.rp.satfinite.ue8m0x2.f32``): ``amax / max_elem`` (448 / 57344 / 6) rounded up to a power of two,
  within ``[2**-127, 2**127]``, Inf saturating to ``2**127``, NaN giving NaN. Elements: ``x * 2**-e``
  (exact).
- NVFP4: ``t = amax_tensor / 2688`` (``1`` for an all-zero tensor); block scale ``a / 6 / t`` clamped to
  ``[2**-6, 448]`` and rounded to e4m3 (nearest even); elements ``x * ((1 / t) / sb)``; dequantized as
  ``q * (t * sb)`` (torchao's ``nvfp4_quantize`` order).
- ``fp8_block``: ``s = a / 448`` (``1`` for an all-zero block); elements ``x / s`` (IEEE division).

Elements are rounded to nearest even and saturate at the element's largest value (448, 57344, 6; +-Inf
too); NaN stays NaN (FP4 has no NaN code: it packs as +0, its block's scale marks it where the scale came
from the data). Torch's float8 dtypes hold e4m3 / e5m2 elements (the casts are exact: the values are
already rounded); FP4 elements come as float32 values, or packed (``packed=True``): uint8, two e2m1 codes
per byte along the last dimension, element ``2j`` in the low nibble (bits 0-3) and ``2j + 1`` in the high
one, the OCP / torchao layout.

Blocks tile ``x.reshape(-1, x.shape[-1])``. Scales come as ``x.shape[:-1] + (ceil(C / k),)`` for ``(1, k)``
blocks and ``(ceil(R / k), ceil(C / k))`` for ``(k, k)`` tiles. Ragged edges (``C``, or ``R`` for tiles,
not a multiple of the block) are allowed: the last block holds the elements that exist, as if padded
with zeros (torchao requires ``C % k == 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mono_quant.blockwise import (
    BlockRule,
    block_grid,
    dequantize_blocks,
    dynamic_amax,
    quantize_blocks,
    scale_codes,
)
from mono_quant.minifloat import E2M1, E4M3, E5M2, Minifloat, decode_e2m1, e2m1_codes, pack_fp4, unpack_fp4
from mono_quant.ops import block_fake_quantize

__all__ = [
    "FORMATS",
    "ROUNDINGS",
    "BlockFormat",
    "BlockQuantized",
    "check_block_size",
    "dequantize",
    "fake_quantize",
    "get_format",
    "quantize",
    "scales_from_amax",
    "tensor_scale_from_amax",
    "tensor_scale_from_range",
]

ROUNDINGS = ("floor", "rceil")
_E8M0 = getattr(torch, "float8_e8m0fnu", torch.uint8)  # torch < 2.7: the codes as uint8
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NVFP4_TENSOR_DIVISOR = E4M3.max * E2M1.max  # 2688


@dataclass(frozen=True)
class BlockFormat:
    """One block format (see the module docstring for the rules).

    Attributes:
        name: the key in ``FORMATS``.
        element: the element format.
        block_sizes: the block sizes it takes, the default first.
        scale: ``"e8m0"``, ``"e4m3"`` or ``"fp32"``: how a block's scale is stored.
        tensor_scale: whether it also has a float32 per-tensor scale (NVFP4).
        element_dtype: the torch dtype of its elements (``None`` for FP4: float32 values or packed uint8).
    """

    name: str
    element: Minifloat
    block_sizes: tuple[tuple[int, int], ...]
    scale: str
    tensor_scale: bool = False
    element_dtype: torch.dtype | None = None

    @property
    def block_size(self) -> tuple[int, int]:
        """The default block size."""
        return self.block_sizes[0]

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype of the block scales: ``float8_e8m0fnu``, ``float8_e4m3fn`` or ``float32``."""
        return {"e8m0": _E8M0, "e4m3": torch.float8_e4m3fn, "fp32": torch.float32}[self.scale]

    def rule(self, rounding: str = "floor") -> BlockRule:
        """The ``BlockRule`` of this format under ``rounding``.

        Raises:
            ValueError: ``rounding`` is not ``"floor"`` / ``"rceil"``, or is ``"rceil"`` for a format
                without power-of-two scales.
        """
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r} is not one of {', '.join(map(repr, ROUNDINGS))}")
        if self.scale == "e8m0":
            return BlockRule(self.element, f"e8m0_{rounding}")
        if rounding != "floor":
            raise ValueError(
                f"rounding={rounding!r} chooses how an MX (E8M0) scale is rounded; {self.name} has "
                f"{self.scale} scales, computed one way only: leave rounding at 'floor'"
            )
        return BlockRule(self.element, "nvfp4" if self.scale == "e4m3" else "fp32")


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("mxfp8_e4m3", E4M3, ((1, 32),), "e8m0", element_dtype=torch.float8_e4m3fn),
        BlockFormat("mxfp8_e5m2", E5M2, ((1, 32),), "e8m0", element_dtype=torch.float8_e5m2),
        BlockFormat("mxfp4_e2m1", E2M1, ((1, 32),), "e8m0"),
        BlockFormat("nvfp4", E2M1, ((1, 16),), "e4m3", tensor_scale=True),
        BlockFormat("fp8_block", E4M3, ((1, 128), (128, 128)), "fp32", element_dtype=torch.float8_e4m3fn),
    )
}


class BlockQuantized(NamedTuple):
    """A block-quantized tensor: ``data`` (elements), ``scales`` (per block, the format's dtype and layout)
    and ``tensor_scale`` (float32 ``()`` for NVFP4, else ``None``)."""

    data: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None


def get_format(format: str | BlockFormat) -> BlockFormat:
    """The ``BlockFormat`` named ``format`` (or ``format`` itself).

    Raises:
        ValueError: a name not in ``FORMATS`` (the message lists them).
    """
    if isinstance(format, BlockFormat):
        return format
    found = FORMATS.get(format) if isinstance(format, str) else None
    if found is None:
        raise ValueError(f"unknown block format {format!r}; use one of: {', '.join(FORMATS)}")
    return found


def check_block_size(fmt: BlockFormat, block_size=None) -> tuple[int, int]:
    """``block_size`` as a tuple the format takes (``None``: its default).

    Raises:
        ValueError: a block size the format does not define (MX blocks are 32 along the last
            dimension, NVFP4 blocks 16; ``fp8_block`` takes (1, 128) and (128, 128)).
    """
    if block_size is None:
        return fmt.block_size
    try:
        block = tuple(int(b) for b in block_size)
    except (TypeError, ValueError):
        block = None
    if block not in fmt.block_sizes:
        shown = " or ".join(str(b) for b in fmt.block_sizes)
        raise ValueError(f"{fmt.name} blocks are {shown}, got block_size={block_size!r}")
    return block


def _check_tensor(x, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"block formats quantize float16, bfloat16, float32 or float64 tensors, got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError("block formats quantize tensors of at least one dimension, got a 0-d tensor")


def tensor_scale_from_amax(amax: torch.Tensor, format: str | BlockFormat) -> torch.Tensor | None:
    """The per-tensor scale of ``format`` for a tensor whose absolute maximum is ``amax``.

    NVFP4: ``amax / (448 * 6)`` in float32, ``1`` where that is 0 (an all-zero tensor); ``None`` for the
    formats without one.
    """
    fmt = get_format(format)
    if not fmt.tensor_scale:
        return None
    t = amax.to(torch.float32) / NVFP4_TENSOR_DIVISOR
    return torch.where(t == 0, 1.0, t)


def tensor_scale_from_range(min_val, max_val, format: str | BlockFormat = "nvfp4") -> torch.Tensor | None:
    """The per-tensor scale from a range (a ``MinMaxObserver``'s ``min_val`` / ``max_val``, or a histogram
    observer's searched range): ``tensor_scale_from_amax(max(-min_val, max_val))``.

    This is how NVFP4 activations get their per-tensor scale from calibration: the block scales are taken
    from each block at run time, only ``t`` is static.
    """
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32, device=lo.device)
    return tensor_scale_from_amax(torch.maximum(-lo, hi), format)


def scales_from_amax(
    amax: torch.Tensor,
    format: str | BlockFormat,
    *,
    rounding: str = "floor",
    tensor_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block scales of ``format`` from block amaxes (any shape, float32; NaN / Inf as the rules say).

    Args:
        tensor_scale: NVFP4's per-tensor scale; ``None``: from ``amax.max()``.

    Returns:
        the shape of ``amax``, in ``format``'s scale dtype.
    """
    fmt = get_format(format)
    rule = fmt.rule(rounding)
    amax = amax.to(torch.float32)
    if fmt.tensor_scale and tensor_scale is None:
        tensor_scale = tensor_scale_from_amax(amax.max(), fmt)
    return _encode(scale_codes(amax, rule, tensor_scale), fmt)


def _encode(codes: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Scale codes of ``blockwise.scale_codes`` in the format's dtype."""
    if fmt.scale == "e8m0":
        return codes.view(_E8M0) if _E8M0 is not torch.uint8 else codes
    return codes.to(fmt.scale_dtype)


def _decode(scales: torch.Tensor, fmt: BlockFormat, shape: tuple[int, int]) -> torch.Tensor:
    """User-given scales as ``blockwise`` takes them, ``[RB, CB]``.

    Raises:
        ValueError: the scales have another dtype or another number of blocks.
    """
    if not isinstance(scales, torch.Tensor) or scales.dtype != fmt.scale_dtype:
        got = scales.dtype if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"{fmt.name} scales must be a {fmt.scale_dtype} tensor, got {got}")
    if scales.numel() != shape[0] * shape[1]:
        raise ValueError(
            f"{fmt.name}: expected {shape[0]} x {shape[1]} block scales for this tensor, got scales of "
            f"shape {tuple(scales.shape)}"
        )
    scales = scales.reshape(shape)
    return scales.view(torch.uint8) if fmt.scale == "e8m0" else scales.float()


def _layout(scales: torch.Tensor, x_shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """``[RB, CB]`` scales in the public layout: ``x.shape[:-1] + (CB,)`` for ``(1, k)`` blocks."""
    return scales.reshape(*x_shape[:-1], scales.shape[-1]) if block[0] == 1 else scales


def _prepare(x, format, block_size, rounding, tensor_scale):
    _check_tensor(x)
    fmt = get_format(format)
    block = check_block_size(fmt, block_size)
    rule = fmt.rule(rounding)
    if tensor_scale is not None:
        tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
    return fmt, block, rule, tensor_scale


def quantize(
    x: torch.Tensor,
    format: str | BlockFormat,
    *,
    block_size=None,
    rounding: str = "floor",
    scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | float | None = None,
    packed: bool = False,
) -> BlockQuantized:
    """Quantize ``x`` to a block format.

    Args:
        x: float tensor ``(..., C)``, at least 1-D.
        format: a name of ``FORMATS`` (or a ``BlockFormat``).
        block_size: one of the format's block sizes (default: its first).
        rounding: ``"floor"`` or ``"rceil"`` (MX formats only).
        scales: the block scales to use (for example a ``PerBlockObserver``'s), in the format's dtype and
            layout; ``None``: from each block's amax (NaN if the block holds a NaN, else Inf if it holds an
            Inf: torchao's ``to_mx``).
        tensor_scale: NVFP4's per-tensor scale; ``None``: from ``max |x|``.
        packed: FP4 elements as packed uint8 (``C`` must be even) instead of float32 values.

    Returns:
        ``BlockQuantized(data, scales, tensor_scale)``: ``data`` of ``x``'s shape (float8 elements, float32
        FP4 values) or ``(..., C // 2)`` uint8 when packed.

    Raises:
        TypeError: ``x`` is not a float16 / bfloat16 / float32 / float64 tensor.
        ValueError: a 0-d ``x``, an unknown format, block size or rounding, scales of the wrong dtype or
            shape, or ``packed`` with an odd ``C`` or a format with 8-bit elements.
    """
    fmt, block, rule, tensor_scale = _prepare(x, format, block_size, rounding, tensor_scale)
    if packed and fmt.element is not E2M1:
        raise ValueError(f"packed=True packs FP4 elements; {fmt.name} has {fmt.element.name} elements")
    if packed and x.shape[-1] % 2:
        raise ValueError(
            f"packed FP4 holds two values per byte: the last dimension must be even, got {x.shape}"
        )
    x2d = x.reshape(-1, x.shape[-1])
    grid = block_grid(tuple(x2d.shape), block)
    if scales is None:
        amax = dynamic_amax(x2d, block)
        if fmt.tensor_scale and tensor_scale is None:
            tensor_scale = tensor_scale_from_amax(x2d.abs().amax().float(), fmt)
        codes = scale_codes(amax, rule, tensor_scale)
    else:
        if fmt.tensor_scale and tensor_scale is None:
            raise ValueError("nvfp4 scales were given without the tensor_scale they were computed with")
        codes = _decode(scales, fmt, grid)
    values = quantize_blocks(x2d, block, rule, codes, tensor_scale).reshape(x.shape)
    if fmt.element_dtype is not None:
        data = values.to(fmt.element_dtype)
    elif packed:
        data = pack_fp4(e2m1_codes(values))
    else:
        data = values
    return BlockQuantized(data, _layout(_encode(codes, fmt), x.shape, block), tensor_scale)


def dequantize(
    q: BlockQuantized,
    format: str | BlockFormat,
    *,
    block_size=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The values a ``BlockQuantized`` stands for: ``element * scale`` per block, in ``dtype``.

    Args:
        q: what ``quantize`` returned (packed FP4 data is recognized by its uint8 dtype).
        format, block_size: as for ``quantize``.

    Raises:
        ValueError: an unknown format or block size, or scales that do not fit the data.
    """
    fmt = get_format(format)
    block = check_block_size(fmt, block_size)
    data, scales, tensor_scale = q
    if data.dtype == torch.uint8:
        values = decode_e2m1(unpack_fp4(data))
    else:
        values = data.float()
    v2d = values.reshape(-1, values.shape[-1])
    codes = _decode(scales, fmt, block_grid(tuple(v2d.shape), block))
    rule = fmt.rule("floor")  # dequantizing does not depend on how the scales were rounded
    out = dequantize_blocks(v2d, block, rule, codes, tensor_scale)
    return out.reshape(values.shape).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Fake quantization with the straight-through gradient (the gradient of the identity)."""

    @staticmethod
    def forward(ctx, x, block, rule, scales, tensor_scale, backend):
        return block_fake_quantize(x, block, rule, scales, tensor_scale, backend=backend)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    format: str | BlockFormat,
    *,
    block_size=None,
    rounding: str = "floor",
    scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype and shape, in one pass (the fused kernel on CUDA).

    Equal, bit for bit, to ``dequantize(quantize(x, ...), ..., dtype=x.dtype)`` (NaN stays NaN, where
    packed FP4 would hold +0). Differentiable with the straight-through estimator (the gradient passes
    unchanged), for quantization-aware training. Sync-free on CUDA: no host read, also for NVFP4 without
    ``tensor_scale`` (then ``max |x|`` is one more read of ``x``).

    Args:
        x, format, block_size, rounding, scales, tensor_scale: as for ``quantize``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (``mono_quant.ops``).

    Raises:
        TypeError, ValueError: as for ``quantize``.
    """
    fmt, block, rule, tensor_scale = _prepare(x, format, block_size, rounding, tensor_scale)
    x2d_shape = (x.numel() // x.shape[-1] if x.shape[-1] else 0, x.shape[-1])
    if scales is not None:
        if fmt.tensor_scale and tensor_scale is None:
            raise ValueError("nvfp4 scales were given without the tensor_scale they were computed with")
        codes = _decode(scales, fmt, block_grid(x2d_shape, block))
        scales = codes if fmt.scale != "e4m3" else codes.to(torch.float8_e4m3fn)
    if fmt.tensor_scale and tensor_scale is None:
        tensor_scale = tensor_scale_from_amax(x.detach().abs().amax().float(), fmt)
    return _StraightThrough.apply(x, block, rule, scales, tensor_scale, backend)
