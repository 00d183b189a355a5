"""The observers' statistics in plain torch: the CPU path, the test oracle and the benchmark baseline.

Each public function here has a Triton twin in ``mono_quant.kernels`` with the same signature and the
same result (min/max, counts and grids bit for bit; the EMA to float32 rounding). They update state
tensors in place and never return anything, so a caller can hold the buffers of an ``nn.Module``.

State, shared with the kernels: a ``RangeState`` or a ``HistogramState`` (``mono_quant.state``).

Non-finite values (NaN, +-Inf) are excluded from every statistic and counted. Every update takes a
token ``mask`` (keyword; ``None``: every value): a bool tensor of the leading dims of ``x`` whose ``False``
entries leave their values out of every statistic; they are counted in ``seen[Seen.MASKED]`` and the batch
counts only if some value is kept (``mono_quant.rows``: no copy of ``x``, bounded temporaries). Statistics
are those of the float32 values: a float64 input is converted once (a copy), and its values beyond the
float32 range become +-inf, so they count as non-finite. On CUDA tensors nothing here reads a value on
the host; on CPU tensors the functions branch on values where that skips work (the non-finite filtering
of a batch that turned out finite) with identical results.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from mono_quant.grid import canonical_grid, floor_scaled, regrid
from mono_quant.rows import FILTER_CHUNK, keep_view, kept_rows, masked_values, pieces
from mono_quant.state import HistogramState, RangeState

__all__ = [
    "finite_minmax",
    "finite_minmax_per_channel",
    "histogram_update_",
    "minmax_per_channel_update_",
    "minmax_update_",
]

# Elements per chunk where a float32 temporary is needed: bounds the extra memory of bf16/fp16 inputs to
# 16 MiB whatever the tensor size.
CHUNK = 1 << 22
# Elements per binning step on the CPU: small enough that the temporaries stay in cache.
BIN_CHUNK = 1 << 16


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


def histogram_update_(x: torch.Tensor, state: HistogramState, *, mask: torch.Tensor | None = None) -> None:
    """Add the finite values of ``x`` to a canonical-grid histogram, in place.

    The new grid is ``canonical_grid`` of the range seen so far, the old counts move to it exactly, then
    ``x`` is binned on it (see ``mono_quant.grid``).

    Args:
        x: non-empty float tensor. state: the histogram, updated in place.
        mask: ``None``, or a bool tensor of the leading dims of ``x`` (module docstring).
    """
    exponent, origin, counts = state.exponent, state.origin, state.counts
    num_bins = counts.shape[0]
    x = _float32_values(x)
    host = _may_branch(x)
    mn, mx, bad = finite_minmax(x) if mask is None else _finite_minmax_masked(x, mask)
    # the grid is a function of the range: on CPU, a batch inside the range seen skips the grid work
    grows = not host or mn.item() < state.running_min.item() or mx.item() > state.running_max.item()
    if grows:
        _update_range_(state.range, mn, mx, None)
        new_e, new_o = canonical_grid(state.running_min, state.running_max, num_bins)
        counts.copy_(regrid(counts, exponent, origin, new_e, new_o))
        exponent.copy_(new_e)
        origin.copy_(new_o)
    if host:  # the grid as Python numbers: 2**-e and origin (|origin| <= 2**24) are exact float32 scalars
        e = int(exponent)
        inv_w, offset = 2.0**-e, float(origin)
    else:
        e = None
        inv_w = torch.ldexp(torch.ones((), dtype=torch.float32, device=x.device), -exponent).to(torch.float32)
        offset = origin.to(torch.float32)
    # x * 2**-e underflows only for a coarse grid (e > 0); on CPU the fix-up pass is skipped otherwise
    fix_underflow = not host or e > 0
    step = BIN_CHUNK if host else CHUNK
    kept = None if mask is None else kept_rows(x, mask, step)
    all_finite = host and int(bad) == 0 and (mask is None or kept is not None)
    if mask is None:
        flat = x.reshape(-1)
        work = ((c, None) for c in ((flat,) if flat.numel() <= step else flat.split(step)))
    elif kept is not None:  # CPU: the kept rows, gathered in pieces
        work = ((c, None) for p in kept for c in p.reshape(-1).split(step))
    else:  # pieces of x and of the mask broadcast to it (views), each flattened (bounded copies)
        work = ((p.reshape(-1), k.reshape(-1)) for p, k, _ in pieces(x, keep_view(x, mask), step))
    for chunk, keep in work:
        chunk = chunk.to(torch.float32)
        if fix_underflow:  # a tiny negative can underflow to -0.0, whose floor is 0: pinned to -1
            t = floor_scaled(chunk, inv_w)
        else:
            t = chunk * inv_w  # exact: a power of two
            t.floor_()
        t -= offset  # both integers of magnitude <= 2**24 (the grid's rule), bins < B <= 2**21 + 2: exact
        if keep is not None:
            t = torch.where(keep, t, -1.0)  # masked values: outside histc's range, as NaN
        if all_finite:  # every t is a bin number in [0, B): bincount is 4x faster than histc on CPU
            counts += torch.bincount(t.to(torch.int64), minlength=num_bins)
            continue
        # t holds integer bin numbers; with edges at -0.5, 0.5, ... every integer lands in its own bin
        # whatever histc's rounding, and NaN / +-Inf fall outside and are skipped. Float counts are exact
        # per chunk (< 2**24 values). No data-dependent shape, no host read.
        counts += torch.histc(t, bins=num_bins, min=-0.5, max=num_bins - 0.5).to(torch.int64)
    _count_(state.seen, x.numel(), bad, 0 if mask is None else masked_values(x, mask))


# --- amax history (TransformerEngine's delayed scaling; mono_quant.history) ---------------------------------

from mono_quant.history import F32_MAX as _F32_MAX  # noqa: E402
from mono_quant.history import amax_scale  # noqa: E402


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


# --- block formats (issue 16): twins of mono_quant.kernels.blocks -------------------------------------------
# The arithmetic is in mono_quant.blockwise (block grids, amaxes, scale rules) and mono_quant.minifloat
# (element rounding, e8m0 / e4m3 codes).

from mono_quant.blockwise import (  # noqa: E402
    dynamic_amax,
    fake_quantize_blocks,
    finite_block_amax,
    scale_codes,
)

__all__ += ["block_amax_update_", "block_fake_quantize"]


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
