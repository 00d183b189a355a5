"""The range twins in plain torch: finite min/max (per tensor and per channel), the running min/max or
moving-average update, and the ``seen`` counts.

The shared floor of the other twins (``reference_histogram``, ``reference_training``, ``reference_blocks``,
``reference_segments``): the float32 view of an input, the CPU branch test, the counts and the range fold.
The contract (non-finite values, token masks, float64 inputs, no host read on CUDA) is that of
``mono_quant.reference``, which re-exports the twins (all but those of ``reference_segments``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mono_quant.rows import FILTER_CHUNK, keep_view, kept_rows, masked_values, pieces
from mono_quant.state import RangeState

__all__ = [
    "finite_minmax",
    "finite_minmax_per_channel",
    "minmax_per_channel_update_",
    "minmax_update_",
]


def _float32_values(x: torch.Tensor) -> torch.Tensor:
    """``x``, or its float32 values where ``x`` is float64 (the narrower types convert exactly)."""
    return x.float() if x.dtype == torch.float64 else x


def _may_branch(x: torch.Tensor) -> bool:
    """Reading values costs nothing on the CPU (no stream to stall)."""
    return x.device.type == "cpu"


def finite_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min and max of the finite values of ``x`` and the number of non-finite ones.

    Args:
        x: a non-empty float tensor of any shape and strides.

    Returns:
        ``(min, max, nonfinite)``: 0-d float32, float32 (``+inf``/``-inf`` if no value is finite), int64.
    """
    mn, mx = torch.aminmax(x)
    if _may_branch(x) and math.isfinite(mn.item()) and math.isfinite(mx.item()):
        return mn.float(), mx.float(), torch.zeros((), dtype=torch.int64)
    return _finite_minmax_filtered(x)


def _finite_minmax_filtered(
    x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``finite_minmax`` by filtering, ``FILTER_CHUNK`` values at a time (bounded temporaries); with a
    ``mask``, of the values under ``True`` only (``bad``: the non-finite ones among them)."""
    inf = torch.full((), float("inf"), dtype=torch.float32, device=x.device)  # a fill, not a host copy
    mn, mx, bad = inf, -inf, torch.zeros((), dtype=torch.int64, device=x.device)
    if mask is not None:
        for piece, keep, _ in pieces(x, keep_view(x, mask), FILTER_CHUNK):
            finite = torch.isfinite(piece)
            ok = finite & keep
            mn = torch.minimum(mn, torch.where(ok, piece, inf).amin().float())
            mx = torch.maximum(mx, torch.where(ok, piece, -inf).amax().float())
            bad = bad + (keep & ~finite).sum()
        return mn, mx, bad
    for chunk in x.reshape(-1).split(FILTER_CHUNK):
        finite = torch.isfinite(chunk)
        mn = torch.minimum(mn, torch.where(finite, chunk, inf).amin().float())
        mx = torch.maximum(mx, torch.where(finite, chunk, -inf).amax().float())
        bad = bad + (~finite).sum()
    return mn, mx, bad


def _finite_minmax_masked(x: torch.Tensor, mask: torch.Tensor):
    """``finite_minmax`` of the values under ``mask``: on the CPU the kept rows in gathered pieces through
    the unmasked fast path, elsewhere by filtering in place (no host read)."""
    kept = kept_rows(x, mask)
    if kept is None:
        return _finite_minmax_filtered(x, mask)
    inf = torch.full((), float("inf"), dtype=torch.float32)
    mn, mx, bad = inf, -inf, torch.zeros((), dtype=torch.int64)
    for piece in kept:
        a, b, c = finite_minmax(piece)
        mn, mx, bad = torch.minimum(mn, a), torch.maximum(mx, b), bad + c
    return mn, mx, bad


def finite_minmax_per_channel(
    x: torch.Tensor, ch_axis: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the finite values of ``x`` along ``ch_axis``, and the non-finite count.

    Args:
        x: a non-empty float tensor with ``C = x.shape[ch_axis]``.
        mask: ``None``, or a bool tensor of the leading dims of ``x``: only the values under ``True``.

    Returns:
        ``(min, max, nonfinite)``: float32 ``(C,)`` (``+inf``/``-inf`` for a channel with no finite value),
        float32 ``(C,)``, int64 ``()``.
    """
    axis = ch_axis % x.dim()
    kept = None if mask is None or axis < mask.dim() else kept_rows(x, mask)
    if kept is not None:  # CPU, channels inside the rows: the kept rows through the unmasked path
        shift = axis - mask.dim() + 1
        mn = torch.full((x.shape[axis],), float("inf"))
        mx, bad = torch.full_like(mn, float("-inf")), torch.zeros((), dtype=torch.int64)
        for piece in kept:
            a, b, c = finite_minmax_per_channel(piece, shift)
            mn, mx, bad = torch.minimum(mn, a), torch.maximum(mx, b), bad + c
        return mn, mx, bad
    if mask is not None:
        return _finite_minmax_per_channel_filtered(x.movedim(axis, -1), keep_view(x, mask).movedim(axis, -1))
    dims = [d for d in range(x.dim()) if d != axis]
    if dims:
        # two reductions: on CPU torch.aminmax(dim=...) is 3-4x slower than amin + amax (measured)
        mn, mx = torch.amin(x, dim=dims), torch.amax(x, dim=dims)
        # NaN or +-Inf in any channel makes the sum non-finite (so can an overflow: that only costs the
        # filtering pass below, never a wrong result)
        if _may_branch(x) and math.isfinite((mn.float() - mx.float()).sum().item()):
            return mn.float(), mx.float(), torch.zeros((), dtype=torch.int64)
        del mn, mx  # (C,) each: freed before the filtering allocates its own
    return _finite_minmax_per_channel_filtered(x.movedim(axis, -1))


def _finite_minmax_per_channel_filtered(
    v: torch.Tensor, k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``finite_minmax_per_channel`` of ``v`` (channels last, any strides) by filtering, in pieces of at most
    ``FILTER_CHUNK`` values (``rows.pieces``): the temporaries (a mask and a filtered copy) stay bounded
    whatever the input. ``k``: the keep view of a token mask (channels last too), or ``None``."""
    mn = torch.full(v.shape[-1:], float("inf"), dtype=torch.float32, device=v.device)
    mx = torch.full(v.shape[-1:], float("-inf"), dtype=torch.float32, device=v.device)
    bad = torch.zeros((), dtype=torch.int64, device=v.device)
    for piece, keep, cols in pieces(v, k, FILTER_CHUNK):
        lead = tuple(range(piece.dim() - 1))  # reduced in place of a reshape (which could copy)
        finite = torch.isfinite(piece)
        if keep is not None:
            bad += (keep & ~finite).sum()
            finite &= keep
        else:
            bad += piece.numel() - finite.sum()
        t = torch.where(finite, piece, float("inf"))  # one filtered copy of the piece, reused for the max
        torch.minimum(mn[cols], (t.amin(dim=lead) if lead else t).float(), out=mn[cols])
        torch.where(finite, piece, torch.full((), float("-inf"), dtype=t.dtype, device=t.device), out=t)
        torch.maximum(mx[cols], (t.amax(dim=lead) if lead else t).float(), out=mx[cols])
    return mn, mx, bad


def _count_(seen: torch.Tensor, n: int, bad: torch.Tensor | int, masked: torch.Tensor | int = 0) -> None:
    """``seen += [finite, non-finite, 1 batch, masked]`` (the ``Seen`` slots) for a batch of ``n`` values,
    ``masked`` of them under a mask's ``False`` and ``bad`` of the others non-finite; the batch counts only
    if some value is kept."""
    if _may_branch(seen):
        # in place through numpy's view of the CPU buffer: 1 us, where building a tensor of the four
        # host integers and adding it takes 4 (an int64 buffer never takes part in autograd)
        b, m = int(bad), int(masked)
        seen.numpy()[:] += (n - m - b, b, int(n > m), m)
    elif isinstance(masked, int) and masked == 0:
        bad = torch.as_tensor(bad, device=seen.device)
        seen += torch.stack([n - bad, bad, torch.ones_like(bad), torch.zeros_like(bad)])
    else:
        kept = n - masked
        seen += torch.stack([kept - bad, bad, (kept > 0).to(torch.int64), masked + torch.zeros_like(bad)])


def _ema32(run: np.float32, cur: np.float32, c: np.float32) -> np.float32:
    """``run + c * (cur - run)`` in float32 (the formula torch.ao uses, each op rounded once), for finite
    ``run`` and ``cur``; with ``c == 1`` exactly ``cur`` (the formula cancels: 1e8 then 1 gives 0); where
    ``cur - run`` passes float32's range, the same ops in float64, rounded once (finite: the exact result
    lies between ``run`` and ``cur``)."""
    if c == 1:
        return cur
    if abs(float(cur) - float(run)) < 2.0**126:  # far from float32's limit: the formula cannot overflow
        return run + c * (cur - run)
    with np.errstate(over="ignore"):
        ema = run + c * (cur - run)
    if math.isinf(ema):
        ema = np.float32(np.float64(run) + np.float64(c) * (np.float64(cur) - np.float64(run)))
    return ema


def _ema_tensor(run: torch.Tensor, cur: torch.Tensor, c: float) -> torch.Tensor:
    """``_ema32`` elementwise on float32 tensors (any values: lanes where ``run`` or ``cur`` is infinite
    hold garbage that the caller does not select)."""
    if np.float32(c) == 1:
        return cur
    ema = run + c * (cur - run)  # c rounds to float32 in a float32 op, as np.float32(c) above
    overflow = torch.isinf(ema)
    if not _may_branch(ema) or bool(overflow.any()):
        c64 = float(np.float32(c))
        ema64 = (run.double() + c64 * (cur.double() - run.double())).float()
        ema = torch.where(overflow, ema64, ema)
    return ema


def _update_range_(
    state: RangeState, mn: torch.Tensor, mx: torch.Tensor, averaging_constant: float | None
) -> None:
    """Fold a batch's finite range ``(mn, mx)`` into ``state``: min/max, or the moving average (``_ema32``)
    started by the first batch with a finite value; a batch with nothing finite (``+-inf``) keeps it."""
    running_min, running_max = state.running_min, state.running_max
    if averaging_constant is None:
        torch.minimum(running_min, mn, out=running_min)
        torch.maximum(running_max, mx, out=running_max)
        return
    if _may_branch(running_min) and running_min.dim() == 0:
        # per tensor on CPU: branch on the values, and do the same float32 ops on numpy scalars (each
        # rounded to float32 as torch rounds them; a third of the time of three tensor ops)
        c = np.float32(averaging_constant)
        for run, cur in ((running_min, mn), (running_max, mx)):
            r, v = np.float32(run.item()), np.float32(cur.item())
            if math.isinf(r):
                run.fill_(float(v))
            elif not math.isinf(v):
                run.fill_(float(_ema32(r, v, c)))
        return
    for run, cur in ((running_min, mn), (running_max, mx)):
        ema = _ema_tensor(run, cur, averaging_constant)
        run.copy_(torch.where(torch.isinf(run), cur, torch.where(torch.isinf(cur), run, ema)))


def minmax_update_(
    x: torch.Tensor,
    state: RangeState,
    averaging_constant: float | None = None,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """Fold the finite min/max of ``x`` into the running range, in place.

    ``averaging_constant=None``: running min/max. Otherwise the moving average
    ``run = run + c * (batch - run)`` (that is ``(1 - c) * run + c * batch``), started by the first batch
    with a finite value; a batch with no finite value leaves it unchanged.

    Args:
        x: non-empty float tensor. state: a per-tensor ``RangeState`` (``()`` running min/max).
        mask: ``None``, or a bool tensor of the leading dims of ``x`` (module docstring).
    """
    x = _float32_values(x)
    if mask is not None:
        mn, mx, bad = _finite_minmax_masked(x, mask)
        _update_range_(state, mn, mx, averaging_constant)
        _count_(state.seen, x.numel(), bad, masked_values(x, mask))
        return
    if _may_branch(x):  # CPU: the common all-finite batch without the non-finite bookkeeping tensors
        mn, mx = torch.aminmax(x)
        if math.isfinite(mn.item()) and math.isfinite(mx.item()):
            _update_range_(state, mn.float(), mx.float(), averaging_constant)
            _count_(state.seen, x.numel(), 0)
            return
        mn, mx, bad = _finite_minmax_filtered(x)
    else:
        mn, mx, bad = finite_minmax(x)
    _update_range_(state, mn, mx, averaging_constant)
    _count_(state.seen, x.numel(), bad)


def minmax_per_channel_update_(
    x: torch.Tensor,
    ch_axis: int,
    state: RangeState,
    averaging_constant: float | None = None,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """Per-channel ``minmax_update_`` along ``ch_axis``: the state's running min/max are float32 ``(C,)``;
    ``mask`` as in ``minmax_update_``."""
    x = _float32_values(x)
    mn, mx, bad = finite_minmax_per_channel(x, ch_axis, mask)
    _update_range_(state, mn, mx, averaging_constant)
    _count_(state.seen, x.numel(), bad, 0 if mask is None else masked_values(x, mask))
