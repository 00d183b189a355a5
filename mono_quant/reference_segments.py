"""Segmented observation in plain torch (MoE experts): E sets of statistics in one state.

``x`` is ``[N, ...]``: its rows are ``x.shape[0]`` (activations of ``[batch, seq, hidden]`` are observed
as ``x.reshape(-1, hidden)``, a view, with the routing of ``[batch * seq]`` tokens). ``segments`` is an
integer ``[N]`` (one segment a row) or ``[N, k]`` (top-k routing: the row counts for every segment listed,
once even if listed twice). A token ``mask`` (``mono_quant.rows``) covers the leading dims of ``x`` as for
every observer; a segment's statistics are then exactly those of a plain observer fed the rows routed to
it (``x[rows]`` under ``mask[rows]``), and segments that receive no row this call are untouched.

Routing entries outside ``[0, E)`` are dropped into a dump slot and counted in ``state.invalid``: on the
CPU that is an error first (``ValueError``, nothing changed), on CUDA nothing reads a value on the host.

The min/max update (``minmax_segments_update_``) is the kernel's twin: per-row finite min / max and counts
in pieces of rows (bounded temporaries, no copy of ``x``), then one scatter per routing column into
``E + 1`` slots, sync-free; on the CPU, where reading the routing costs nothing, the plain update of each
segment's rows (gathered), exactly the same result. The histogram update (``histogram_segments_update_``,
twin of ``mono_quant.kernels.segment_histogram``) is likewise the plain update per segment on the CPU and
sync-free elsewhere: the segments' ranges as above, every segment's grid at once, then each value binned on
the grid of every segment its row lists. ``each_segment_rows`` gives the CPU loops their rows.
"""

from __future__ import annotations

import torch

from mono_quant.grid import canonical_grid, floor_scaled, regrid
from mono_quant.reference_histogram import histogram_update_
from mono_quant.reference_range import (
    _float32_values,
    _may_branch,
    _update_range_,
    minmax_per_channel_update_,
    minmax_update_,
)
from mono_quant.rows import FILTER_CHUNK, keep_view
from mono_quant.state import HistogramState, RangeState, SegmentState

__all__ = [
    "check_routing_values",
    "each_segment_rows",
    "histogram_segments_update_",
    "minmax_segments_update_",
    "routed_rows",
    "routing",
]


def routing(segments: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing as ``[N, k]`` int64 slots in ``[0, E]`` (``E``: the dump slot, for entries outside
    ``[0, E)`` and repeats of a segment in one row), and how many entries were outside (int64 ``()``)."""
    idx = segments.reshape(segments.shape[0], -1).to(torch.int64)
    outside = (idx < 0) | (idx >= num_segments)
    drop = outside.clone()
    for j in range(1, idx.shape[1]):  # a row lists a segment once: later repeats go to the dump slot
        drop[:, j] |= (idx[:, :j] == idx[:, j : j + 1]).any(1)
    return torch.where(drop, num_segments, idx), outside.sum()


def check_routing_values(segments: torch.Tensor, num_segments: int) -> None:
    """On the CPU, refuse routing entries outside ``[0, num_segments)`` (elsewhere: nothing, no host read).

    Raises:
        ValueError: the first such entry, with its row.
    """
    if not _may_branch(segments) or segments.numel() == 0:
        return
    bad = (segments < 0) | (segments >= num_segments)
    if bool(bad.any()):
        at = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"segments must lie in [0, num_segments) = [0, {num_segments}), got {int(segments[at])} at "
            f"segments{list(at)} ({int(bad.sum())} entries outside)"
        )


def _kept_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """int64 ``[N]``: 1 where row ``i`` has a value under ``True`` (every row without a mask)."""
    n = x.shape[0]
    if mask is None:
        return torch.ones(n, dtype=torch.int64, device=x.device)
    if mask.dim() == 0:
        return mask.to(torch.int64).expand(n)
    return mask.reshape(n, -1).any(1).to(torch.int64)


def _row_stats(x: torch.Tensor, mask: torch.Tensor | None, ch_axis: int | None):
    """Per row of ``x``: the finite min and max of its kept values (float32 ``[N]``, or ``[N, C]`` along
    ``ch_axis``), and int64 ``[N, 3]``: its kept finite, kept non-finite and masked value counts."""
    n = x.shape[0]
    v = x if ch_axis is None else x.movedim(ch_axis, -1)  # channels last; a view
    k = None if mask is None else keep_view(x, mask)
    k = k if k is None or ch_axis is None else k.movedim(ch_axis, -1)
    chan = () if ch_axis is None else v.shape[-1:]
    mn = torch.empty((n, *chan), dtype=torch.float32, device=x.device)
    mx = torch.empty_like(mn)
    counts = torch.empty((n, 3), dtype=torch.int64, device=x.device)
    inner = max(x[0].numel() if n else 1, 1)
    step = max(FILTER_CHUNK // inner, 1)
    inf = torch.full((), float("inf"), dtype=v.dtype, device=x.device)
    for start in range(0, n, step):
        s = slice(start, start + step)
        piece = v[s]
        lead = tuple(range(1, piece.dim() - (ch_axis is not None)))  # all but the row (and channel) dims
        all_dims = tuple(range(1, piece.dim()))
        total = piece[0].numel()
        finite = torch.isfinite(piece)
        ok = finite if k is None else finite & k[s]
        t = torch.where(ok, piece, inf)
        mn[s] = (t.amin(dim=lead) if lead else t).float()
        torch.where(ok, piece, -inf, out=t)
        mx[s] = (t.amax(dim=lead) if lead else t).float()
        kept = ok.sum(all_dims) if all_dims else ok.to(torch.int64)
        if k is None:
            kept_all = torch.full_like(kept, total)
        else:
            kk = k[s]
            kept_all = kk.sum(all_dims) if all_dims else kk.to(torch.int64)
        counts[s, 0] = kept
        counts[s, 1] = kept_all - kept
        counts[s, 2] = total - kept_all
    return mn, mx, counts


def minmax_segments_update_(
    x: torch.Tensor,
    segments: torch.Tensor,
    state: SegmentState,
    averaging_constant: float | None = None,
    *,
    ch_axis: int | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """Fold the rows of ``x`` into the running range of each segment they are routed to, in place.

    Per segment ``e`` the result equals ``reference.minmax_update_`` (or the per-channel one) of the rows
    routed to ``e``: min/max or the moving average (a segment that gets no row, or no finite value, keeps
    its range), ``seen[e]`` counted as for those rows alone, ``tokens_seen[e]`` += the rows not wholly masked.

    Args:
        x: non-empty float tensor ``[N, ...]`` (rows along dim 0).
        segments: integer ``[N]`` or ``[N, k]``, values in ``[0, E)``.
        state: a ``SegmentState`` of ``E`` segments: range ``(E,)`` per tensor, ``(E, C)`` per channel.
        averaging_constant: ``None`` for min/max, else the EMA constant.
        ch_axis: ``None`` per tensor, else the channel axis (not 0, the rows' axis).
        mask: ``None``, or a bool tensor of the leading dims of ``x``.

    Raises:
        ValueError: on the CPU, routing entries outside ``[0, E)`` (nothing changes).
    """
    num_segments = state.tokens_seen.shape[0]
    check_routing_values(segments, num_segments)
    axis = None if ch_axis is None else ch_axis % x.dim()
    if _may_branch(x):  # CPU: per segment, the plain update of its rows (reading the routing costs nothing)

        def update(e, rows, part):
            sub = RangeState(state.running_min[e], state.running_max[e], state.seen[e])
            if axis is None:
                minmax_update_(rows, sub, averaging_constant, mask=part)
            else:
                minmax_per_channel_update_(rows, axis, sub, averaging_constant, mask=part)

        each_segment_rows(x, segments, mask, state.tokens_seen, update)
        return
    slots, outside = routing(segments, num_segments)
    _minmax_segments_free_(_float32_values(x), slots, outside, state, averaging_constant, axis, mask)


def _minmax_segments_free_(x, slots, outside, state: SegmentState, averaging_constant, axis, mask) -> None:
    """``minmax_segments_update_`` with nothing read on the host (float32-valued ``x``, ``axis`` >= 1 or
    ``None``; ``slots, outside = routing(segments, E)``): per-row stats, one scatter per routing column into
    ``E + 1`` slots."""
    num_segments = state.tokens_seen.shape[0]
    mn, mx, counts = _row_stats(x, mask, axis)
    per_row = torch.cat([counts, _kept_rows(x, mask)[:, None]], 1)  # finite, non-finite, masked, token
    seg_min = torch.full((num_segments + 1, *mn.shape[1:]), float("inf"), device=x.device)
    seg_max = torch.full_like(seg_min, float("-inf"))
    seg_counts = torch.zeros((num_segments + 1, 4), dtype=torch.int64, device=x.device)
    for j in range(slots.shape[1]):  # one scatter per routing column: amin / amax / sum are order-free
        col = slots[:, j]
        at = col.reshape(-1, *(1,) * (mn.dim() - 1)).expand(mn.shape)
        seg_min.scatter_reduce_(0, at, mn, "amin")
        seg_max.scatter_reduce_(0, at, mx, "amax")
        seg_counts.index_add_(0, col, per_row)
    _update_range_(RangeState(state.running_min, state.running_max, state.seen), seg_min[:-1], seg_max[:-1],
                   averaging_constant)  # fmt: skip
    finite, nonfinite, masked, tokens = seg_counts[:-1].unbind(1)
    batches = (finite + nonfinite > 0).to(torch.int64)
    state.seen.add_(torch.stack([finite, nonfinite, batches, masked], 1))
    state.tokens_seen.add_(tokens)
    state.invalid.add_(outside)


def routed_rows(segments: torch.Tensor, num_segments: int) -> list[torch.Tensor | None]:
    """Per segment, the int64 indices of the rows routed to it (``None`` where none is); reads the host."""
    slots, _ = routing(segments, num_segments)
    k = slots.shape[1]
    flat = slots.reshape(-1)  # position p holds an entry of row p // k
    order = torch.argsort(flat, stable=True)  # positions ascending within a segment, the dump slot E last
    sizes = torch.bincount(flat, minlength=num_segments + 1)[:num_segments].tolist()
    rows = order // k if k > 1 else order  # a row lists a segment once (routing), so no row repeats
    out, start = [], 0
    for size in sizes:
        out.append(rows[start : start + size] if size else None)
        start += size
    return out


def each_segment_rows(
    x: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor | None, tokens_seen: torch.Tensor, update
) -> None:
    """Per segment ``e`` that receives rows: ``update(e, x[rows], mask[rows])`` (the rows gathered, a mask of
    0 dims as it is), then ``tokens_seen[e]`` (int64 ``(E,)``, ``[in, out]``) += the rows not wholly
    masked. Reads the routing on the host (``routed_rows``). One gathered copy is alive at a time: the
    allocator reuses its memory for the next segment's (a generator handing the copies out kept two alive,
    and the CPU paid fresh pages for each: 2x the time of a loop of plain observers)."""
    kept = None if mask is None else _kept_rows(x, mask)
    tokens = torch.zeros_like(tokens_seen)
    for e, rows in enumerate(routed_rows(segments, tokens_seen.shape[0])):
        if rows is None:
            continue
        part = mask if mask is None or mask.dim() == 0 else mask.index_select(0, rows)
        update(e, x.index_select(0, rows), part)
        tokens[e] = rows.numel() if kept is None else kept.index_select(0, rows).sum()
    tokens_seen.add_(tokens)


def histogram_segments_update_(
    x: torch.Tensor,
    segments: torch.Tensor,
    state: HistogramState,
    tokens_seen: torch.Tensor,
    invalid: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """Add the rows of ``x`` to the histogram of each segment they are routed to, in place: per segment
    exactly ``reference.histogram_update_`` of its rows (under their part of ``mask``); segments that get
    no row are untouched.

    On the CPU, that update per segment (the routing read on the host); elsewhere nothing is read on the
    host: the segments' ranges by ``minmax_segments_update_``'s scatter, every segment's grid at once
    (``canonical_grid`` and ``regrid`` of ``(E,)`` grids), then each value binned on the grid of every
    segment its row lists, counted by one ``index_add_`` per piece and routing column (the twin of
    ``mono_quant.kernels.segment_histogram``). Same counts either way: they are integers.

    Args:
        x: non-empty float tensor ``[N, ...]``. segments: integer ``[N]`` or ``[N, k]``.
        state: a ``HistogramState`` with a leading ``E`` dim on every tensor (range ``(E,)``, seen
            ``(E, 4)``, exponent / origin ``(E,)``, counts ``(E, B)``).
        tokens_seen: int64 ``(E,)``; invalid: int64 ``()`` (as in ``SegmentState``).
        mask: ``None``, or a bool tensor of the leading dims of ``x``.

    Raises:
        ValueError: on the CPU, routing entries outside ``[0, E)`` (nothing changes).
    """
    num_segments = tokens_seen.shape[0]
    check_routing_values(segments, num_segments)
    if _may_branch(x):

        def update(e, rows, part):
            histogram_update_(rows, HistogramState(*(t[e] for t in state)), mask=part)

        each_segment_rows(x, segments, mask, tokens_seen, update)  # no entry is outside: refused above
        return
    x = _float32_values(x)
    slots, outside = routing(segments, num_segments)
    ranges = SegmentState(state.running_min, state.running_max, state.seen, tokens_seen, invalid)
    _minmax_segments_free_(x, slots, outside, ranges, None, None, mask)
    new_e, new_o = canonical_grid(state.running_min, state.running_max, state.counts.shape[1])
    state.counts.copy_(regrid(state.counts, state.exponent, state.origin, new_e, new_o))
    state.exponent.copy_(new_e)
    state.origin.copy_(new_o)
    _bin_segments_(x, slots, state, mask)


def _bin_segments_(x: torch.Tensor, slots: torch.Tensor, state: HistogramState, mask) -> None:
    """Add every kept finite value of row ``i`` of ``x`` (float32 values) to the histogram of each segment
    ``slots[i]`` lists, on that segment's grid (slot ``E``: nothing), in pieces of rows (bounded
    temporaries); sync-free."""
    num_segments, num_bins = state.counts.shape
    n, dev = x.shape[0], x.device
    keep = None if mask is None else keep_view(x, mask)
    dump = num_segments * num_bins  # one slot past the bins of every segment
    exponent = torch.cat([state.exponent, state.exponent[:1]])  # slot E: any grid, its values are dropped
    inv_w = torch.ldexp(torch.ones(num_segments + 1, device=dev), -exponent).to(torch.float32)
    offset = torch.cat([state.origin, state.origin[:1]]).to(torch.float32)
    flat = torch.zeros(dump + 1, dtype=torch.int64, device=dev)
    one = torch.ones((), dtype=torch.int64, device=dev)
    step = max(FILTER_CHUNK // max(x[0].numel(), 1), 1)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        piece = x[rows].reshape(min(step, n - start), -1)
        ok = torch.isfinite(piece)
        if keep is not None:
            ok &= keep[rows].reshape(piece.shape)
        for j in range(slots.shape[1]):
            s = slots[rows, j]
            t = floor_scaled(piece, inv_w[s][:, None]) - offset[s][:, None]
            on = ok & (s < num_segments)[:, None] & (t >= 0) & (t < num_bins)
            at = torch.where(on, s[:, None] * num_bins + torch.where(on, t, 0.0).to(torch.int64), dump)
            flat.index_add_(0, at.reshape(-1), one.expand(at.numel()))
    state.counts.add_(flat[:dump].view(num_segments, num_bins))
