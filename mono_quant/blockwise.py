"""Block arithmetic in plain torch: block grids, per-block amaxes, scales from amaxes, elements.

The shared floor of ``mono_quant.reference`` (the twins of ``kernels/blocks.py``) and
``mono_quant.core.formats`` (the block formats and their public quantize / dequantize). A block format is
passed around as a ``BlockRule``: its element format and the rule that turns a block's amax into its scale.

Blocks tile a 2-D view ``[R, C]`` (``x.reshape(-1, x.shape[-1])``) with ``(br, bc)`` blocks: ``(1, k)``
along the last dimension or ``(k, k)`` tiles, giving a grid of ``ceil(R / br) x ceil(C / bc)`` blocks.
Ragged edges: where ``C`` (or ``R`` for tiles) is not a multiple of the block, the last block holds the
elements that are there and nothing else (its amax is theirs; the scale and the quantization of those
elements are as for any block).

Scale rules (``BlockRule.scale``), from a block's amax ``a`` (float32):

- ``"e8m0_floor"``, ``"e8m0_rceil"``: ``minifloat.e8m0_from_amax``; elements ``x * 2**(127 - s)``.
- ``"nvfp4"``: with the per-tensor scale ``t``: ``sb = e4m3(clamp(a / 6 / t, 2**-6, 448))`` (float32 ops in
  this order, the e4m3 rounding to nearest even); elements ``x * ((1 / t) / sb)``, dequantized as
  ``q * (t * sb)``. (torchao's ``nvfp4_quantize`` order; ``2**-6``, the smallest normal e4m3, as there.)
- ``"fp32"``: ``s = a / 448``, ``1`` where that is 0 (an all-zero block); elements ``x / s``, dequantized
  as ``q * s`` (DeepSeek-V3's 128-blocked FP8).

Elements are then rounded to the element format (``minifloat.round_to_element``). The dynamic amax of a
block (``dynamic_amax``, what quantizing a tensor without given scales uses) is NaN if the block holds a
NaN, else +Inf if it holds an infinity, else the max of ``|x|``: torchao's ``to_mx`` rule.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mono_quant.minifloat import (
    E4M3,
    Minifloat,
    e8m0_from_amax,
    e8m0_reciprocal,
    e8m0_value,
    round_to_element,
)

__all__ = [
    "NVFP4_SCALE_MIN",
    "SCALE_RULES",
    "BlockRule",
    "block_grid",
    "dequantize_blocks",
    "dynamic_amax",
    "fake_quantize_blocks",
    "finite_block_amax",
    "quantize_blocks",
    "scale_codes",
]

SCALE_RULES = ("e8m0_floor", "e8m0_rceil", "nvfp4", "fp32")
NVFP4_SCALE_MIN = 2.0**-6  # the smallest normal e4m3: NVFP4 block scales are clamped to [2**-6, 448]


class BlockRule(NamedTuple):
    """What the arithmetic of a block format needs: its element format and its scale rule."""

    elem: Minifloat
    scale: str


def block_grid(shape2d: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """``(ceil(R / br), ceil(C / bc))``: the block grid of a ``[R, C]`` view."""
    (r, c), (br, bc) = shape2d, block
    return -(-r // br), -(-c // bc)


def _padded(x2d: torch.Tensor, block: tuple[int, int], fill: float) -> torch.Tensor:
    """``x2d`` as ``[Rb, br, Cb, bc]``, ragged edges padded with ``fill`` (a copy only where ragged)."""
    (r, c), (br, bc) = x2d.shape, block
    rb, cb = block_grid((r, c), block)
    if (rb * br, cb * bc) != (r, c):
        out = x2d.new_full((rb * br, cb * bc), fill)
        out[:r, :c] = x2d
        x2d = out
    return x2d.reshape(rb, br, cb, bc)


def finite_block_amax(x2d: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block max of ``|x|`` over the finite values, and the number of non-finite values.

    Args:
        x2d: ``[R, C]`` float tensor (any float dtype; float64 beyond the float32 range counts as
            non-finite, as everywhere).

    Returns:
        ``(amax, nonfinite)``: float32 ``[Rb, Cb]`` (``-inf`` for a block with no finite value) and int64
        ``()``.
    """
    x2d = x2d.float() if x2d.dtype == torch.float64 else x2d
    if x2d.device.type == "cpu":  # reading values costs nothing here: skip the filtering when finite
        a = dynamic_amax(x2d, block)
        if bool(torch.isfinite(a).all()):
            return a, torch.zeros((), dtype=torch.int64)
    finite = torch.isfinite(x2d)
    masked = torch.where(finite, x2d.abs(), float("-inf"))
    return _padded(masked, block, float("-inf")).amax(dim=(1, 3)).float(), (~finite).sum()


def dynamic_amax(x2d: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-block amax as quantizing without given scales sees it: NaN if the block holds a NaN, else
    +Inf if it holds an infinity, else the max of ``|x|``. float32 ``[Rb, Cb]``."""
    return _padded(x2d, block, 0.0).abs().amax(dim=(1, 3)).float()


def scale_codes(
    amax: torch.Tensor, rule: BlockRule, tensor_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Block scales from block amaxes (float32), in the rule's own encoding.

    Returns:
        the shape of ``amax``: uint8 e8m0 codes (``e8m0_*``), float32 values exactly of e4m3
        (``nvfp4``: cast them to ``torch.float8_e4m3fn`` losslessly), or float32 (``fp32``).

    Raises:
        ValueError: ``nvfp4`` without ``tensor_scale``, or an unknown rule.
    """
    if rule.scale in ("e8m0_floor", "e8m0_rceil"):
        return e8m0_from_amax(amax, rule.elem, rule.scale.removeprefix("e8m0_"))
    if rule.scale == "nvfp4":
        if tensor_scale is None:
            raise ValueError("the nvfp4 block scales need the per-tensor scale")
        sb = (amax / rule.elem.max) / tensor_scale
        sb = torch.where(sb < NVFP4_SCALE_MIN, NVFP4_SCALE_MIN, torch.where(sb > E4M3.max, E4M3.max, sb))
        return round_to_element(sb, E4M3)
    if rule.scale == "fp32":
        s = amax / E4M3.max
        return torch.where(s == 0, 1.0, s)
    raise ValueError(f"unknown scale rule {rule.scale!r}; one of {', '.join(SCALE_RULES)}")


def _factors(codes: torch.Tensor, rule: BlockRule, tensor_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(quantize multiplier, dequantize multiplier)``, float32 (``fp32``: the scale twice,
    as quantizing divides by it)."""
    if rule.scale.startswith("e8m0"):
        return e8m0_reciprocal(codes), e8m0_value(codes)
    sb = codes.float()
    if rule.scale == "nvfp4":
        return (1.0 / tensor_scale) / sb, tensor_scale * sb
    return sb, sb


CHUNK = 1 << 15  # elements per step of the element pass on the CPU: temporaries stay in cache (and malloc)


def _map_blocks(x2d: torch.Tensor, block: tuple[int, int], fn) -> torch.Tensor:
    """``fn(chunk, rows)`` over float32 chunks ``[n, br, Cb, bc]`` of the padded block view of ``x2d``
    (``rows``: the slice of block rows), assembled into float32 ``[R, C]``."""
    (r, c), (br, bc) = x2d.shape, block
    xp = _padded(x2d, block, 0.0)
    out = torch.empty(xp.shape, dtype=torch.float32, device=x2d.device)
    per_row = br * xp.shape[2] * bc
    step = max(1, CHUNK // per_row) if x2d.device.type == "cpu" else xp.shape[0]
    for i in range(0, xp.shape[0], step):
        rows = slice(i, i + step)
        out[rows] = fn(xp[rows].to(torch.float32, copy=True), rows)  # fn works in place
    return out.reshape(xp.shape[0] * br, -1)[:r, :c]


def quantize_blocks(
    x2d: torch.Tensor, block: tuple[int, int], rule: BlockRule, codes: torch.Tensor, tensor_scale=None
) -> torch.Tensor:
    """Element values of ``x2d`` for the block scales ``codes`` (``scale_codes``): float32 ``[R, C]``
    holding values of ``rule.elem`` exactly."""
    q, _ = _factors(codes, rule, tensor_scale)

    def fn(chunk, rows):
        f = q[rows, None, :, None]
        return round_to_element(chunk.div_(f) if rule.scale == "fp32" else chunk.mul_(f), rule.elem)

    return _map_blocks(x2d, block, fn)


def dequantize_blocks(
    values: torch.Tensor, block: tuple[int, int], rule: BlockRule, codes: torch.Tensor, tensor_scale=None
) -> torch.Tensor:
    """``values * scale`` per block (float32 ``[R, C]``), the inverse of ``quantize_blocks``."""
    _, d = _factors(codes, rule, tensor_scale)
    return _map_blocks(values, block, lambda chunk, rows: chunk.mul_(d[rows, None, :, None]))


def fake_quantize_blocks(
    x2d: torch.Tensor, block: tuple[int, int], rule: BlockRule, codes: torch.Tensor, tensor_scale=None
) -> torch.Tensor:
    """``dequantize_blocks(quantize_blocks(...))`` in one pass over ``x2d``: float32 ``[R, C]``."""
    q, d = _factors(codes, rule, tensor_scale)

    def fn(chunk, rows):
        f = q[rows, None, :, None]
        v = round_to_element(chunk.div_(f) if rule.scale == "fp32" else chunk.mul_(f), rule.elem)
        return v.mul_(d[rows, None, :, None])

    return _map_blocks(x2d, block, fn)
