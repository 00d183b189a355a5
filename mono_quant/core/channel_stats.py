"""``ChannelStatsObserver``: per input channel absmax (SmoothQuant), mean ``|x|`` and mean ``x**2`` (AWQ-style
importance); ``smoothing_factors`` turns an absmax and a layer's weights into SmoothQuant's factors.

SmoothQuant (Xiao et al., 2023) moves the difficulty of activation outliers into the weights: for a Linear
``y = x W^T``, with ``X_j`` input channel ``j`` of the activations and ``W_j`` column ``j`` of every weight
that reads them, ``s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)``, then ``x / s`` and ``W * s``. AWQ
ranks input channels by their mean magnitude. Both need exactly these per-channel statistics of a layer's
input, gathered over the calibration set: that is what this observer keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mono_quant.channel_ops import channel_stats_segments_update_, channel_stats_update_
from mono_quant.core.base import RANGE_RULES, ObserverBase, StateError
from mono_quant.core.observers import _check_ch_axis, _check_num_channels
from mono_quant.state import RangeState

__all__ = ["ChannelStatsObserver", "smoothing_factors"]

_SUMS = ("abs_sum", "sq_sum", "count")


class ChannelStatsObserver(ObserverBase):
    """Per channel along ``ch_axis``: min / max (so ``absmax``), ``mean_abs`` and ``mean_square`` of the
    finite values seen. NaN / +-Inf are left out of every statistic and counted (``nonfinite_count``);
    ``obs(x, mask=m)`` leaves out the values under ``False`` of a token mask (``masked_count``), as every
    observer does. ``obs(x, segments=idx, num_segments=E)`` (MoE experts, ``mono_quant.core.segments``)
    keeps E sets of these statistics: every buffer below gains a leading ``E`` dim (``(E, C)``, ``seen``
    ``(E, 4)``) and segment ``e`` (``segment(e)``) holds exactly what a plain observer fed the rows routed to
    ``e`` holds. On the CPU the segmented update runs the plain one per segment on its rows; on CUDA it is
    sync-free (no host read), its float64 sums added in another order than the CPU's: equal to within
    float64 rounding (``channel_ops.channel_stats_segments_update_``).

    Buffers, besides ``running_min`` / ``running_max`` (float32 ``(C,)``) and ``seen``:
        abs_sum, sq_sum: float64 ``(C,)``, the sums of ``|x|`` and ``x**2`` over each channel's finite values.
        count: int64 ``(C,)``, each channel's finite values.
    Segmented, also ``tokens_seen`` (int64 ``(E,)``) and ``invalid_segments`` (int64 ``()``).

    ``calculate_qparams`` gives per-channel qparams of the range, as ``PerChannelMinMaxObserver``. Merges
    exactly across ranks and saved runs for the range and counts; the float64 sums are added (``"sum"``),
    per segment for a segmented observer.

    Args:
        ch_axis: the channel dimension (default -1: ``[..., hidden]`` activations of a Linear).
        num_channels: the channel count, if known: sized at construction (``torch.compile(fullgraph=True)``
            of a fresh observer needs it). ``None``: the first batch sizes the buffers; an observer that saw
            no data still merges (offline or across ranks) with ones that did.
        dtype, qscheme, reduce_range, eps, backend, margin: as for ``MinMaxObserver``.
    """

    # _version 2: as ObserverBase (the class and settings travel in _extra_state).
    MERGE_RULES = {**RANGE_RULES, "abs_sum": "sum", "sq_sum": "sum", "count": "sum"}
    SEGMENT_FIELDS = (*RangeState._fields, *_SUMS)
    CHANNEL_FIELDS = ("running_min", "running_max", *_SUMS)

    def __init__(self, ch_axis: int = -1, num_channels: int | None = None, **kwargs):
        self.ch_axis = _check_ch_axis(ch_axis)
        self.num_channels = _check_num_channels(num_channels)
        super().__init__(**kwargs)
        c = self.num_channels or 0
        self.register_buffer("abs_sum", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("sq_sum", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(c, dtype=torch.int64))

    # --- the statistics --------------------------------------------------------------------------------
    @property
    def absmax(self) -> torch.Tensor | None:
        """float32 ``(C,)``: ``max |x|`` per channel (``-inf`` where a channel saw nothing finite); ``None``
        before any data."""
        if not self._observed():
            return None
        return torch.maximum(-self.running_min, self.running_max)

    @property
    def mean_abs(self) -> torch.Tensor | None:
        """float64 ``(C,)``: the mean of ``|x|`` per channel (NaN where a channel saw nothing finite)."""
        return self.abs_sum / self.count if self._observed() else None

    @property
    def mean_square(self) -> torch.Tensor | None:
        """float64 ``(C,)``: the mean of ``x**2`` per channel (NaN where a channel saw nothing finite)."""
        return self.sq_sum / self.count if self._observed() else None

    # --- the update --------------------------------------------------------------------------------------
    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        axis, sized_now = self._channel_axis(x)
        try:
            state = self.range_state()
            channel_stats_update_(
                x, axis, state, self.abs_sum, self.sq_sum, self.count, mask=mask, backend=self.backend
            )
        except BaseException:
            if sized_now:  # a failed first observation does not fix the channel count
                self._resize_channels(0)
            raise

    def _observe_segments(self, x: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor | None) -> None:
        channel_stats_segments_update_(
            x, self.ch_axis % x.dim(), segments, self.range_state(), self.abs_sum, self.sq_sum, self.count,
            self.tokens_seen, self.invalid_segments, mask=mask, backend=self.backend,
        )  # fmt: skip

    def _resize_channels(self, channels: int) -> None:
        super()._resize_channels(channels)
        for name in _SUMS:
            self._buffers[name].resize_(channels).zero_()

    def reset(self) -> None:
        super().reset()
        for name in _SUMS:
            self._buffers[name].zero_()

    def check_state(self, buffers: dict[str, torch.Tensor] | None = None) -> None:
        """``ObserverBase.check_state``, and the sums': one length with the range, counts ``>= 0`` adding up
        to the finite values seen, sums ``>= 0`` and finite, zero where a channel counted nothing (segmented:
        each segment alone)."""
        if {**self._buffers, **(buffers or {})}["seen"].dim() == 2:  # segmented: each segment alone
            return super().check_state(buffers)
        super().check_state(buffers)
        b = {n: t.detach().cpu() for n, t in {**self._buffers, **(buffers or {})}.items() if t is not None}
        channels = b["running_min"].numel()
        for name in _SUMS:
            if b[name].shape != (channels,):
                raise StateError(name, f"has shape {tuple(b[name].shape)}; the range has {channels} channels")
        count, abs_sum, sq_sum = b["count"], b["abs_sum"], b["sq_sum"]
        if bool((count < 0).any()):
            raise StateError("count", "holds negative counts")
        finite = int(b["seen"][0])
        if channels and int(count.sum()) != finite:
            raise StateError("count", f"sums to {int(count.sum())} but seen counts {finite} finite values")
        for name, t in (("abs_sum", abs_sum), ("sq_sum", sq_sum)):
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise StateError(name, "must be finite and >= 0")
            if bool((t[count == 0] != 0).any()):
                raise StateError(name, "is not 0 in a channel that counted no value")


def _weight_absmax(weights) -> torch.Tensor:
    """float64 ``(in,)``: max ``|W|`` over the output channels of every weight (``[out, in]`` each)."""
    if isinstance(weights, (nn.Module, torch.Tensor)):
        weights = [weights]
    if not isinstance(weights, Sequence) or not weights:
        raise TypeError("weights must be an nn.Linear, a [out, in] tensor, or a non-empty list of them")
    cols = []
    for w in weights:
        w = w.weight if isinstance(w, nn.Module) else w
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"a weight must be 2-D [out, in] (an nn.Linear's), got {got}")
        cols.append(w.detach().double().abs().amax(dim=0))
    if len({c.numel() for c in cols}) > 1:
        raise ValueError(f"the weights read inputs of different sizes: {[c.numel() for c in cols]}")
    return torch.stack(cols).amax(dim=0)


def smoothing_factors(
    activations: ChannelStatsObserver | torch.Tensor,
    weights,
    alpha: float = 0.5,
    min_scale: float = 1e-5,
) -> torch.Tensor:
    """SmoothQuant's smoothing factors ``s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)``.

    Divide the layer's input by ``s`` (fold ``1 / s`` into the preceding LayerNorm or Linear) and multiply
    the weights' input channels by ``s``: the product is unchanged, and the activation outliers shrink.

    Args:
        activations: the ``ChannelStatsObserver`` of the layer's input (or its ``absmax``, ``(in,)``).
        weights: the ``nn.Linear`` reading that input, its weight ``[out, in]``, or a list of them (q / k / v
            read one input: ``max|W_j|`` is taken over all of them, as SmoothQuant does).
        alpha: the migration strength, in ``[0, 1]`` (0.5 by default; 0.75-0.85 for models with large
            outliers).
        min_scale: the weights' maxima and the result are clamped to at least this, as SmoothQuant's
            reference code does (``1e-5``), so an all-zero channel gets a finite, positive factor.

    Returns:
        float32 ``(in,)``, computed in float64.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, a weight that is not 2-D, or sizes that disagree.
        RuntimeError: the observer saw nothing finite in some channel.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]")
    if isinstance(activations, ChannelStatsObserver):
        activations._check_finite_seen()
        activations = activations.absmax
    x = activations.detach().double().reshape(-1)
    w = _weight_absmax(weights).to(x.device)
    if w.numel() != x.numel():
        raise ValueError(f"the activations have {x.numel()} channels but the weights read {w.numel()}")
    s = x.pow(alpha) / w.clamp(min=min_scale).pow(1 - alpha)
    return s.clamp(min=min_scale).float()
