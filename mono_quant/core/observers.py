"""The observer kinds: MinMax, moving average, per-channel variants and the histogram.

See ``mono_quant.core.base`` for what they share; ``mono_quant.core.registry`` names them.
"""

from __future__ import annotations

import numpy as np
import torch

from mono_quant.core.base import EMA_RULES, RANGE_RULES, ObserverBase
from mono_quant.core.search import HISTOGRAM_METHODS, search_range
from mono_quant.grid import E_MIN, MAX_BINS, bin_edges, internal_bins
from mono_quant.ops import histogram_update_
from mono_quant.state import HistogramState, RangeState

__all__ = [
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
]

_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def _check_averaging_constant(c) -> float:
    ok = not isinstance(c, bool) and isinstance(c, (int, float)) and 0 < c <= 1
    if not ok or np.float32(c) < _TINY:  # a constant that rounds to 0 (or a subnormal) in float32 never moves
        raise ValueError(
            f"averaging_constant={c!r} must be a number with 0 < averaging_constant <= 1 "
            f"(and at least {_TINY:.3g}, the smallest normal float32)"
        )
    return float(c)


def _check_ch_axis(ch_axis) -> int:
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
        raise ValueError(f"ch_axis={ch_axis!r} must be an int")
    return ch_axis


def _check_num_channels(num_channels) -> int | None:
    if num_channels is not None and (
        isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
    ):
        raise ValueError(f"num_channels={num_channels!r} must be a positive int or None")
    return num_channels


class MinMaxObserver(ObserverBase):
    """Range = the min and max of every finite value seen. Exact, cheap; sensitive to outliers.

    Args:
        dtype: ``torch.qint8`` (default), ``torch.quint8``, ``torch.int8``, ``torch.uint8``,
            ``torch.int4``, ``torch.uint4``.
        qscheme: ``"affine"`` (default) or ``"symmetric"`` (or a ``torch.per_*`` constant).
        reduce_range: drop one bit of the integer range.
        eps: smallest scale, a float32 between the smallest normal float32 and its max.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``mono_quant.ops``).
    """


class MovingAverageMinMaxObserver(ObserverBase):
    """Range = exponential moving average of each batch's finite min and max.

    The first batch with a finite value sets the range; each later one applies
    ``new = (1 - c) * old + c * batch`` to both ends (``c = 1``: the last batch's range). Smooths away
    outlier batches.

    Args:
        averaging_constant: ``c``, with ``0 < c <= 1`` (default 0.01).
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.

    Raises:
        ValueError: ``averaging_constant`` outside ``(0, 1]``.
    """

    MERGE_RULES = EMA_RULES

    def __init__(self, averaging_constant: float = 0.01, **kwargs):
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        super().__init__(**kwargs)


class PerChannelMinMaxObserver(ObserverBase):
    """``MinMaxObserver`` for each channel along ``ch_axis``: ``scale``/``zero_point`` of shape ``(C,)``.

    Args:
        ch_axis: the channel dimension (default 0; negative counts from the end, ``-1`` for
            ``[tokens, hidden]`` activations).
        num_channels: the channel count, if known: the buffers are sized at construction (needed for
            ``torch.compile(fullgraph=True)`` of a fresh observer). ``None`` (default): the first batch
            sizes them, and ``reset()`` forgets the count.
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.
    """

    def __init__(self, ch_axis: int = 0, num_channels: int | None = None, **kwargs):
        self.ch_axis = _check_ch_axis(ch_axis)
        self.num_channels = _check_num_channels(num_channels)
        super().__init__(**kwargs)


class MovingAveragePerChannelMinMaxObserver(ObserverBase):
    """``MovingAverageMinMaxObserver`` for each channel along ``ch_axis``.

    Args:
        averaging_constant: ``0 < c <= 1`` (default 0.01). ch_axis, num_channels: as for
            ``PerChannelMinMaxObserver``.
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.
    """

    MERGE_RULES = EMA_RULES

    def __init__(
        self, averaging_constant: float = 0.01, ch_axis: int = 0, num_channels: int | None = None, **kwargs
    ):
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        self.ch_axis = _check_ch_axis(ch_axis)
        self.num_channels = _check_num_channels(num_channels)
        super().__init__(**kwargs)


class HistogramObserver(ObserverBase):
    """Exact histogram of every finite value seen; the range is chosen by a threshold search.

    The histogram lives on the canonical power-of-two grid of ``mono_quant.grid``: feeding the
    same values in any batching and order gives identical counts and edges, counts are int64, memory is
    bounded by ``bins``, and the bin width is never coarser than ``(max - min) / bins``.

    Args:
        bins: resolution guarantee, an int from 1 to ``grid.MAX_BINS`` (2**20; default 2048); ``2 * bins + 2``
            bins are held.
        method: ``"kl"`` (entropy calibration as in TensorRT / ModelOpt), ``"mse"`` or ``"percentile"``.
        percentile: for ``method="percentile"``, the share of values the range keeps, in ``(50, 100]``
            (default 99.99; below 50 the two ends of an affine range would cross).
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.

    Raises:
        ValueError: bad ``bins``, ``method`` or ``percentile``.
    """

    MERGE_RULES = {**RANGE_RULES, "exponent": "grid", "origin": "grid", "counts": "counts"}

    def __init__(self, bins: int = 2048, method: str = "kl", percentile: float = 99.99, **kwargs):
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
            raise ValueError(f"bins={bins!r} must be an int from 1 to {MAX_BINS}")
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, HISTOGRAM_METHODS))}")
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 50 < percentile <= 100
        ):
            raise ValueError(f"percentile={percentile!r} must be a number in (50, 100]")
        super().__init__(**kwargs)
        self.bins = bins
        self.method = method
        self.percentile = float(percentile)
        empty = HistogramState.empty(internal_bins(bins))
        for name in HistogramState._fields[len(RangeState._fields) :]:
            self.register_buffer(name, getattr(empty, name))

    def settings(self) -> dict:
        out = {**super().settings(), "bins": self.bins, "method": self.method}
        if self.method == "percentile":
            out["percentile"] = self.percentile
        return out

    @property
    def histogram_counts(self) -> torch.Tensor | None:
        """int64 counts of the ``2 * bins + 2`` bins; ``None`` before any finite value."""
        return self.counts if self._has_finite() else None

    @property
    def bin_edges(self) -> torch.Tensor | None:
        """float64 edges (``len(histogram_counts) + 1``, exact); ``None`` before any finite value."""
        if not self._has_finite():
            return None
        return bin_edges(self.exponent, self.origin, self.counts.shape[0])

    def state(self) -> HistogramState:
        """The histogram as a ``HistogramState`` (views of the buffers), e.g. for ``merge_histograms``."""
        return HistogramState(*(self._buffers[name] for name in HistogramState._fields))

    def reset(self) -> None:
        super().reset()
        self.exponent.fill_(E_MIN)
        self.origin.zero_()
        self.counts.zero_()

    def _observe(self, x: torch.Tensor) -> None:
        histogram_update_(x, self.state(), backend=self.backend)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = search_range(
            self.counts,
            self.exponent,
            self.origin,
            self.method,
            symmetric=self.qscheme == "symmetric",
            levels=self.spec.qmax - self.spec.qmin + 1,
            percentile=self.percentile,
        )
        # the search works on bin edges; never quantize beyond what was seen
        lo = torch.maximum(
            torch.tensor(lo, dtype=torch.float32, device=self.running_min.device), self.running_min
        )
        hi = torch.minimum(
            torch.tensor(hi, dtype=torch.float32, device=self.running_max.device), self.running_max
        )
        return lo, hi

    def extra_repr(self) -> str:
        extra = f"bins={self.bins}, method={self.method!r}"
        if self.method == "percentile":
            extra += f", percentile={self.percentile}"
        return f"{extra}, {super().extra_repr()}"
