"""The training-time twins in plain torch: the amax history of delayed scaling (``mono_quant.history``,
TransformerEngine's recipe) and fake quantization (``mono_quant.core.fake_quant``), alone and fused with
the observer step (``observe_fake_quantize_``, ``amax_history_fake_quantize_``).

Twins of ``mono_quant.kernels.amax`` and ``mono_quant.kernels.fake_quant``; the contract is that of
``mono_quant.reference``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from mono_quant.history import F32_MAX as _F32_MAX
from mono_quant.history import amax_scale
from mono_quant.reference_range import (
    _count_,
    _finite_minmax_masked,
    _float32_values,
    _may_branch,
    _update_range_,
    finite_minmax,
    minmax_update_,
)
from mono_quant.rows import masked_values
from mono_quant.state import RangeState

__all__ = [
    "AmaxHistoryStateView",
    "amax_history_fake_quantize_",
    "amax_history_update_",
    "fake_quantize_",
    "observe_fake_quantize_",
]

# --- amax history (TransformerEngine's delayed scaling; mono_quant.history) ---------------------------------


def _amax_scale_host(amax, scale, multiplier: float, divisor: float, eps: float) -> np.float32:
    """``amax_scale`` on numpy float32 scalars (the same roundings), for the CPU path."""
    a, m, d = np.float32(amax), np.float32(multiplier), np.float32(divisor)
    if not (a > 0 and math.isfinite(a)):
        return np.float32(scale)
    with np.errstate(over="ignore"):
        t = a * m / d
        if math.isinf(t):
            t = a / d * m
    return np.float32(min(max(t, np.float32(eps)), np.float32(_F32_MAX)))


def amax_history_update_(
    x: torch.Tensor,
    state,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """One step of an amax history (``mono_quant.history``), in place.

    The batch's amax ``a = max(|finite values of x|)`` (0 if none is finite) goes to the front of the rolled
    history; ``delayed_scale`` takes ``scale``; then, for ``algo`` ``"max"`` / ``"most_recent"``, ``scale``
    becomes ``history.amax_scale`` of the history's max / of ``a`` (``"none"``: left to the caller). The
    range and ``seen`` are updated as by ``minmax_update_``. A batch whose values are all masked is no step:
    only its masked values are counted.

    Args:
        x: non-empty float tensor. state: an ``AmaxHistoryState`` (its ``ticket`` is not touched).
        algo: ``"max"``, ``"most_recent"`` or ``"none"``. multiplier, divisor, eps: of ``amax_scale``.
        mask: ``None``, or a bool tensor of the leading dims of ``x`` (module docstring).
    """
    x = _float32_values(x)
    masked = 0 if mask is None else masked_values(x, mask)
    mn, mx, bad = finite_minmax(x) if mask is None else _finite_minmax_masked(x, mask)
    _update_range_(state.range, mn, mx, None)
    _count_(state.seen, x.numel(), bad, masked)
    hist, scale = state.amax_history, state.scale
    if mask is not None and not _may_branch(x):  # CUDA: the step computed, kept where a value was
        new = AmaxHistoryStateView(hist.clone(), scale.clone(), state.delayed_scale.clone())
        _history_step_(new, mn, mx, algo, multiplier, divisor, eps)
        took = x.numel() - masked > 0
        for old, t in zip((hist, scale, state.delayed_scale), new, strict=True):
            old.copy_(torch.where(took, t, old))
        return
    if masked == x.numel():  # CPU: every value masked, no step
        return
    if _may_branch(x):  # CPU: numpy float32 scalars and numpy's view of the history (the same roundings)
        # + 0: an all-zero batch gives +0.0, not -0.0
        a = max(np.float32(-mn.item()), np.float32(mx.item()), np.float32(0)) + np.float32(0)
        h = hist.numpy()
        h[1:] = h[:-1]  # numpy copies overlapping views as if through a temporary
        h[0] = a
        old = np.float32(scale.item())
        state.delayed_scale.fill_(float(old))
        if algo != "none":
            amax = h.max() if algo == "max" else a
            scale.fill_(float(_amax_scale_host(amax, old, multiplier, divisor, eps)))
        return
    _history_step_(
        AmaxHistoryStateView(hist, scale, state.delayed_scale), mn, mx, algo, multiplier, divisor, eps
    )


class AmaxHistoryStateView(NamedTuple):
    """The part of an ``AmaxHistoryState`` one step of the history changes."""

    amax_history: torch.Tensor
    scale: torch.Tensor
    delayed_scale: torch.Tensor


def _history_step_(s: AmaxHistoryStateView, mn, mx, algo: str, multiplier, divisor, eps) -> None:
    """The history's step in tensor ops (no host read), from the batch's finite range ``(mn, mx)``."""
    a = torch.maximum(torch.maximum(-mn, mx), torch.zeros_like(mx)) + 0.0
    s.amax_history.copy_(torch.cat([a.reshape(1), s.amax_history[:-1]]))
    s.delayed_scale.copy_(s.scale)
    if algo != "none":
        amax = s.amax_history.amax() if algo == "max" else a
        s.scale.copy_(amax_scale(amax, s.scale, multiplier, divisor, eps))


# --- fake quantization (mono_quant.core.fake_quant) -------------------------------------------------------


def _per_channel_view(t: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """A ``(C,)`` qparam shaped to broadcast along ``ch_axis`` of ``x`` (a 0-d one as it is)."""
    if ch_axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def fake_quantize_(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
    ch_axis: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` and return ``(out, mask)``: the values and where the gradient passes.

    Integer targets follow ``torch.fake_quantize_per_tensor_affine`` / ``per_channel_affine`` (CPU) step by
    step, so output and mask are theirs bit for bit wherever ``x`` is finite and ``|x / scale| < 2**63``::

        q    = round(x * (1 / scale)) + zero_point           # float32 (float64 for a float64 x), half to even
        mask = quant_min <= q <= quant_max
        out  = (clamp(q, quant_min, quant_max) - zero_point) * scale      # float32 (per channel, float64
                                                                          # for a float64 x), then x.dtype
    where they differ by design: NaN stays NaN (mask False), and ``+-inf`` and values beyond ``2**63`` steps
    saturate to the nearer end (torch's per-channel op, which casts them to int64, sends them to
    ``quant_min``). FP8 targets (``fp8_dtype``): ``y = x / scale`` in float32, ``mask = |y| <= fp8_max``,
    ``out = clamp(y, +-fp8_max).to(fp8_dtype).float() * scale`` (NaN stays NaN).

    Args:
        x: non-empty float tensor. scale: float32, 0-d or ``(C,)``; zero_point: int32 of the same shape (not
            read for FP8). quant_min, quant_max: the integer range. fp8_dtype: a float8 dtype, or ``None``
            for the integer range. ch_axis: the channel dimension of ``x`` for ``(C,)`` qparams.

    Returns:
        ``out`` shaped like ``x`` in its dtype, ``mask`` bool shaped like ``x``.
    """
    # in place wherever it can be: on the CPU a fresh buffer costs its page faults, more than the op
    s = _per_channel_view(scale, x, ch_axis)
    if fp8_dtype is not None:
        m = torch.finfo(fp8_dtype).max
        y = x.float() / s
        mask = y >= -m
        mask &= y <= m  # |y| <= fp8_max; NaN: False
        out = y.clamp_(-m, m).to(fp8_dtype).float().mul_(s)
        return out.to(x.dtype), mask
    inv = _per_channel_view(torch.ones_like(scale) / scale, x, ch_axis)
    if x.dtype in (torch.float32, torch.float64):
        q = x * inv  # float64 x: float64 (as C++ double * float)
    else:  # fp16 / bf16 -> float32 is exact; multiplied in float32 as torch's kernel does
        q = x.float()
        q *= inv
    q.round_()
    zp = _per_channel_view(zero_point, x, ch_axis).to(q.dtype)
    q += zp
    mask = q >= quant_min
    mask &= q <= quant_max  # NaN: False
    q.clamp_(quant_min, quant_max)  # NaN stays NaN
    q -= zp
    if q.dtype == torch.float64 and ch_axis is None:  # torch's per-tensor product is float32
        q = q.float()
    return q.mul_(s).to(x.dtype), mask


def observe_fake_quantize_(
    x: torch.Tensor,
    state: RangeState,
    averaging_constant: float | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fake_quantize_(x, scale, zero_point, ...)`` (per tensor), then ``minmax_update_(x, state, c)``: the
    delayed step of ``FakeQuantize`` (its Triton twin reads ``x`` once for both). Returns ``(out, mask)``."""
    out, mask = fake_quantize_(x, scale, zero_point, quant_min, quant_max, fp8_dtype, None)
    minmax_update_(x, state, averaging_constant)
    return out, mask


def amax_history_fake_quantize_(
    x: torch.Tensor,
    state,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delayed scaling: ``fake_quantize_`` of ``x`` with ``state.scale`` (from before this batch), then
    ``amax_history_update_`` (its Triton twin does both in one launch). Returns ``(out, mask)``."""
    out, mask = fake_quantize_(x, state.scale, zero_point, quant_min, quant_max, fp8_dtype, None)
    amax_history_update_(x, state, algo, multiplier, divisor, eps)
    return out, mask
