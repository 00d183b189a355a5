"""The update of ``ChannelStatsObserver``: per-channel min/max (``ops.minmax_per_channel_update_``, the
kernels on CUDA) and the float64 sums behind the channel means, in torch ops on every device.

The sums are the values' of float32 (a float64 input is converted first, as everywhere here): ``|x|`` and
``x**2`` of a float32 value are exact in float64, and they are summed in float64, ``FILTER_CHUNK`` values
at a time (``rows.pieces``: the float64 copy of a piece is 8 MiB whatever the input). A token mask is read
through a broadcast view (no copy of ``x``). Nothing is read on the host for CUDA tensors.

A segmented update (``channel_stats_segments_update_``) on the CPU runs the plain update per segment on its
rows (reading the routing costs nothing there); elsewhere it is sync-free: the min/max and counts of
``ops.minmax_segments_update_`` (one launch on CUDA) and per-row float64 sums folded into the segments with
``index_add_``, so the sums are added in another order than the CPU's (equal to within float64 rounding;
on CUDA ``index_add_`` adds with atomics, so that order may change from run to run).
"""

from __future__ import annotations

import torch

from mono_quant.ops import minmax_per_channel_update_, minmax_segments_update_
from mono_quant.reference_range import _may_branch
from mono_quant.reference_segments import check_routing_values, each_segment_rows, routing
from mono_quant.rows import FILTER_CHUNK, keep_view, pieces
from mono_quant.state import RangeState, SegmentState

__all__ = ["channel_stats_segments_update_", "channel_stats_update_", "channel_sums_update_"]


def channel_sums_update_(
    x: torch.Tensor,
    ch_axis: int,
    abs_sum: torch.Tensor,
    sq_sum: torch.Tensor,
    count: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> None:
    """Add, per channel along ``ch_axis``, the sums of ``|x|`` and ``x**2`` over the finite values kept by
    ``mask`` (in float64) and how many there were, in place. Non-finite and masked values are left out.

    Args:
        x: [in] non-empty float tensor with ``C = x.shape[ch_axis]``.
        abs_sum, sq_sum: [in, out] float64 ``(C,)``. count: [in, out] int64 ``(C,)``.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x`` (``mask.shape ==
            x.shape[:mask.dim()]``): only the values under ``True``.
    """
    axis = ch_axis % x.dim()
    x = x.float() if x.dtype == torch.float64 else x
    v = x.movedim(axis, -1)
    k = None if mask is None else keep_view(x, mask).movedim(axis, -1)
    host = x.device.type == "cpu"
    for piece, keep, cols in pieces(v, k, FILTER_CHUNK):
        lead = tuple(range(piece.dim() - 1))
        t = piece.double()
        ok = torch.isfinite(t)
        if keep is not None:
            ok &= keep
        if keep is None and host and bool(ok.all()):  # the CPU may branch: no filtering of a clean piece
            count[cols] += piece.numel() // max(piece.shape[-1], 1)
        else:
            t = torch.where(ok, t, 0.0)
            count[cols] += ok.sum(lead) if lead else ok.long()
        a = t.abs()
        abs_sum[cols] += a.sum(lead) if lead else a
        a.mul_(a)
        sq_sum[cols] += a.sum(lead) if lead else a


def channel_stats_update_(
    x: torch.Tensor,
    ch_axis: int,
    state: RangeState,
    abs_sum: torch.Tensor,
    sq_sum: torch.Tensor,
    count: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """``ops.minmax_per_channel_update_(x, ch_axis, state, mask=mask)`` and ``channel_sums_update_``.

    Args:
        x, ch_axis, mask: as in ``channel_sums_update_``. state: [in, out] a per-channel ``RangeState``
            (``(C,)`` min / max). abs_sum, sq_sum, count: [in, out] as in ``channel_sums_update_``.
        backend: of the min/max (``ops.resolve_backend``); the sums are torch ops.
    """
    minmax_per_channel_update_(x, ch_axis, state, mask=mask, backend=backend)
    channel_sums_update_(x, ch_axis, abs_sum, sq_sum, count, mask)


def _segment_sums_(
    x: torch.Tensor,
    ch_axis: int,
    slots: torch.Tensor,
    abs_sum: torch.Tensor,
    sq_sum: torch.Tensor,
    count: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    """Add, per segment and channel, the float64 sums of ``|x|`` and ``x**2`` over the finite kept values of
    the rows routed to it, and how many there were, in place, with no host read: per row (summed over the
    dims that are neither the row's nor the channel's) in pieces of about ``FILTER_CHUNK`` values, each
    folded into ``E + 1`` slots by one ``index_add_`` per routing column (slot ``E`` is dropped).

    Args:
        x: [in] non-empty float tensor ``[N, ...]``. ch_axis: the channel axis, in ``[1, x.dim())``.
        slots: [in] int64 ``[N, k]`` in ``[0, E]`` (``reference_segments.routing``).
        abs_sum, sq_sum: [in, out] float64 ``(E, C)``. count: [in, out] int64 ``(E, C)``.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``.
    """
    x = x.float() if x.dtype == torch.float64 else x
    v = x.movedim(ch_axis, -1)  # [N, ..., C], a view
    k = None if mask is None else keep_view(x, mask).movedim(ch_axis, -1)
    n, channels = v.shape[0], v.shape[-1]
    seg_abs = torch.zeros((abs_sum.shape[0] + 1, channels), dtype=torch.float64, device=x.device)
    seg_sq = torch.zeros_like(seg_abs)
    seg_count = torch.zeros(seg_abs.shape, dtype=torch.int64, device=x.device)
    step = max(FILTER_CHUNK // max(x[0].numel(), 1), 1)  # whole rows, about FILTER_CHUNK values a piece
    lead = tuple(range(1, v.dim() - 1))  # all but the row and channel dims
    for start in range(0, n, step):
        s = slice(start, start + step)
        t = v[s].double()
        ok = torch.isfinite(t)
        if k is not None:
            ok &= k[s]
        t.masked_fill_(~ok, 0.0).abs_()
        cols = slots[s].unbind(1)
        row = t.sum(lead) if lead else t  # (rows, C); for [N, C] inputs the values themselves
        for col in cols:
            seg_abs.index_add_(0, col, row)
        t.mul_(t)
        row = t.sum(lead) if lead else t
        for col in cols:
            seg_sq.index_add_(0, col, row)
        row = ok.sum(lead) if lead else ok.long()
        for col in cols:
            seg_count.index_add_(0, col, row)
    abs_sum.add_(seg_abs[:-1])
    sq_sum.add_(seg_sq[:-1])
    count.add_(seg_count[:-1])


def channel_stats_segments_update_(
    x: torch.Tensor,
    ch_axis: int,
    segments: torch.Tensor,
    state: RangeState,
    abs_sum: torch.Tensor,
    sq_sum: torch.Tensor,
    count: torch.Tensor,
    tokens_seen: torch.Tensor,
    invalid: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Per segment ``e``, ``channel_stats_update_`` of the rows of ``x`` routed to it (``x[rows]`` under
    ``mask[rows]``) into slice ``e`` of every buffer, in place; ``tokens_seen[e]`` += those rows not wholly
    masked; segments that get no row are untouched. On the CPU exactly that, per segment on its gathered
    rows (``reference_segments.each_segment_rows``); elsewhere sync-free, no host read: the min/max, ``seen``,
    ``tokens_seen`` and ``invalid`` of ``ops.minmax_segments_update_`` (the same counting rules, so the
    same values) and the counts and sums of ``_segment_sums_`` (the same counts; the float64 sums added in
    another order, equal to within float64 rounding).

    Args:
        x: [in] non-empty float tensor ``[N, ...]`` (rows along dim 0). ch_axis: the channel axis, not 0.
        segments: [in] integer ``[N]`` or ``[N, k]`` (a row counts once for every segment it lists).
        state: [in, out] a ``RangeState`` of ``(E, C)`` min / max and ``(E, 4)`` seen.
        abs_sum, sq_sum: [in, out] float64 ``(E, C)``. count: [in, out] int64 ``(E, C)``.
        tokens_seen: [in, out] int64 ``(E,)``. invalid: [in, out] int64 ``()``: routing entries outside
            ``[0, E)`` (dropped; on the CPU refused first).
        mask, backend: as in ``channel_stats_update_`` (``backend`` of the min/max).

    Raises:
        ValueError: on the CPU, routing entries outside ``[0, E)`` (nothing changes).
    """
    num_segments = tokens_seen.shape[0]
    check_routing_values(segments, num_segments)
    axis = ch_axis % x.dim()
    if _may_branch(x):  # CPU: per segment, the plain update of its rows (reading the routing costs nothing)

        def update(e, rows, part):
            sub = RangeState(state.running_min[e], state.running_max[e], state.seen[e])
            sums = abs_sum[e], sq_sum[e], count[e]
            channel_stats_update_(rows, axis, sub, *sums, mask=part, backend=backend)

        each_segment_rows(x, segments, mask, tokens_seen, update)  # no entry is outside: refused above
        return
    ranges = SegmentState(state.running_min, state.running_max, state.seen, tokens_seen, invalid)
    minmax_segments_update_(x, segments, ranges, None, ch_axis=axis, mask=mask, backend=backend)
    _segment_sums_(x, axis, routing(segments, num_segments)[0], abs_sum, sq_sum, count, mask)
