"""The update of ``ChannelStatsObserver``: per-channel min/max (``ops.minmax_per_channel_update_``, the
kernels on CUDA) and the float64 sums behind the channel means, in torch ops on every device.

The sums are the values' of float32 (a float64 input is converted first, as everywhere here): ``|x|`` and
``x**2`` of a float32 value are exact in float64, and they are summed in float64, ``FILTER_CHUNK`` values
at a time (``rows.pieces``: the float64 copy of a piece is 8 MiB whatever the input). A token mask is read
through a broadcast view (no copy of ``x``). Nothing is read on the host for CUDA tensors, but for the
routing of a segmented update (``channel_stats_segments_update_``: one sync a call on CUDA).
"""

from __future__ import annotations

import torch

from mono_quant.ops import minmax_per_channel_update_
from mono_quant.reference_segments import check_routing_values, routing, segment_rows
from mono_quant.rows import FILTER_CHUNK, keep_view, pieces
from mono_quant.state import RangeState

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
    masked. The routing is read on the host (``reference_segments.segment_rows``: one sync a call on CUDA);
    segments that get no row are untouched.

    Args:
        x: [in] non-empty float tensor ``[N, ...]`` (rows along dim 0). ch_axis: the channel axis, not 0.
        segments: [in] integer ``[N]`` or ``[N, k]`` (a row counts once for every segment it lists).
        state: [in, out] a ``RangeState`` of ``(E, C)`` min / max and ``(E, 4)`` seen.
        abs_sum, sq_sum: [in, out] float64 ``(E, C)``. count: [in, out] int64 ``(E, C)``.
        tokens_seen: [in, out] int64 ``(E,)``. invalid: [in, out] int64 ``()``: routing entries outside
            ``[0, E)`` (dropped; on the CPU refused first).
        mask, backend: as in ``channel_stats_update_``.

    Raises:
        ValueError: on the CPU, routing entries outside ``[0, E)`` (nothing changes).
    """
    num_segments = tokens_seen.shape[0]
    check_routing_values(segments, num_segments)
    axis = ch_axis % x.dim()
    for e, rows, part in segment_rows(x, segments, mask, tokens_seen):
        sub = RangeState(state.running_min[e], state.running_max[e], state.seen[e])
        channel_stats_update_(rows, axis, sub, abs_sum[e], sq_sum[e], count[e], mask=part, backend=backend)
    invalid.add_(routing(segments, num_segments)[1])
