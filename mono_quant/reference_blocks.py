"""The block-format twins in plain torch (issue 16): the per-block amax update and the fused
fake-quantize of a block format. Twins of ``mono_quant.kernels.blocks``.

The arithmetic is in ``mono_quant.blockwise`` (block grids, amaxes, scale rules) and
``mono_quant.minifloat`` (element rounding, e8m0 / e4m3 codes); the contract is that of
``mono_quant.reference``.
"""

from __future__ import annotations

import torch

from mono_quant.blockwise import (
    dynamic_amax,
    fake_quantize_blocks,
    finite_block_amax,
    scale_codes,
)
from mono_quant.reference_range import _count_, _float32_values, _may_branch, _update_range_, finite_minmax
from mono_quant.rows import keep_view, masked_values
from mono_quant.state import RangeState

__all__ = ["block_amax_update_", "block_fake_quantize"]


def block_amax_update_(
    x: torch.Tensor,
    block: tuple[int, int],
    state: RangeState,
    block_amax: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """Fold the per-block max of ``|x|`` over the finite values into ``block_amax``, and the finite min / max
    and the counts of ``x`` into ``state``, in place.

    Args:
        x: non-empty float tensor of at least one dimension, viewed as ``[R, C] = [-1, last]``.
        block: ``(1, k)`` or ``(k, k)``.
        state: a per-tensor ``RangeState`` (``()`` running min/max, ``seen``).
        block_amax: float32 ``(ceil(R / br), ceil(C / bc))``, ``-inf`` where no finite value was seen.
        mask: ``None``, or a bool tensor of the leading dims of ``x`` (module docstring). The block
            statistics filter a copy of ``x`` anyway: masked values become NaN there and are not counted.
    """
    if mask is not None:
        x2d = torch.where(keep_view(x, mask), _float32_values(x), float("nan")).reshape(-1, x.shape[-1])
        amax, bad = finite_block_amax(x2d, block)
        torch.maximum(block_amax, amax, out=block_amax)
        mn, mx, _ = finite_minmax(x2d)
        masked = masked_values(x, mask)
        _update_range_(state, mn, mx, None)
        _count_(state.seen, x2d.numel(), bad - masked, masked)
        return
    x2d = _float32_values(x).reshape(-1, x.shape[-1])
    amax, bad = finite_block_amax(x2d, block)
    torch.maximum(block_amax, amax, out=block_amax)
    if _may_branch(x2d) and int(bad) == 0:  # every value finite: the plain min / max
        mn, mx = torch.aminmax(x2d)
        mn, mx = mn.float(), mx.float()
    else:
        mn, mx, bad = finite_minmax(x2d)
    _update_range_(state, mn, mx, None)
    _count_(state.seen, x2d.numel(), bad)


def block_fake_quantize(
    x: torch.Tensor,
    block: tuple[int, int],
    rule,
    scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` for a block format, in ``x``'s dtype and shape.

    Args:
        x: float tensor of at least one dimension, viewed as ``[R, C]``.
        block: ``(1, k)`` or ``(k, k)``.
        rule: the format's ``blockwise.BlockRule``.
        scales: the block scales ``(RB, CB)`` in the rule's encoding (e8m0 codes as uint8 or
            ``float8_e8m0fnu``, ``float8_e4m3fn`` for nvfp4, float32), or ``None``: from each block's
            dynamic amax (``blockwise.dynamic_amax``).
        tensor_scale: float32 ``()``, the per-tensor scale of ``nvfp4``.

    Raises:
        ValueError: ``nvfp4`` without ``tensor_scale``.
    """
    if rule.scale == "nvfp4" and tensor_scale is None:
        raise ValueError("nvfp4 needs its per-tensor scale (tensor_scale)")
    x2d = _float32_values(x).reshape(-1, x.shape[-1])
    if scales is None:
        codes = scale_codes(dynamic_amax(x2d, block), rule, tensor_scale)
    elif rule.scale.startswith("e8m0"):
        codes = scales.view(torch.uint8)
    else:
        codes = scales.float()
    out = fake_quantize_blocks(x2d, block, rule, codes, tensor_scale)
    return out.to(x.dtype).reshape(x.shape)
