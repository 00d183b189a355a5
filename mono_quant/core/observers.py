"""Observer modules: watch tensors, keep running statistics, turn them into scale / zero_point.

Every observer shares one interface: ``forward(x)`` observes ``x`` and returns it unchanged (so it can sit
inline in a model or in a forward hook), ``calculate_qparams()`` returns ``(scale, zero_point)`` and
``reset()`` forgets everything. State lives in registered buffers, updated in place: ``.to(device)``,
``state_dict()`` / ``load_state_dict()`` work, and ``.half()`` / ``.double()`` move the buffers without
changing their dtype (statistics stay float32, counts int64). The statistics come from ``mono_quant.ops``,
which picks the Triton kernels or the torch reference per call; observers never look at the device, and
``forward`` never reads a tensor value on the host.
"""

from __future__ import annotations

import torch
from torch import nn

from mono_quant import grid, ops
from mono_quant.core.qparams import QuantSpec, calculate_qparams
from mono_quant.core.search import HISTOGRAM_METHODS, search_range
from mono_quant.state import HistogramState, RangeState, Seen

__all__ = [
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_EPS = torch.finfo(torch.float32).eps


class ObserverBase(nn.Module):
    """What every observer has: a ``QuantSpec``, a backend, a running range and value counts.

    Buffers:
        running_min, running_max: float32, ``()`` or ``(C,)`` per channel; ``+inf``/``-inf`` until data.
        seen: int64 ``(3,)``: finite values, non-finite values, non-empty batches observed.

    Subclasses set ``ch_axis`` (``None`` per tensor) and ``averaging_constant`` (``None`` for a running
    min/max) or override ``_observe`` / ``_range``.
    """

    # _version 1: the first layout (running_min, running_max, seen[3]; histogram: exponent, origin, counts).
    _version = 1
    ch_axis: int | None = None
    averaging_constant: float | None = None

    def __init__(
        self,
        dtype: torch.dtype = torch.qint8,
        qscheme="affine",
        reduce_range: bool = False,
        eps: float = _EPS,
        backend: str = "auto",
    ):
        super().__init__()
        self.spec = QuantSpec(dtype, qscheme, reduce_range, eps)
        self.backend = ops.check_backend(backend)
        empty = RangeState.empty(() if self.ch_axis is None else (0,))
        for name, buf in zip(RangeState._fields, empty, strict=True):
            self.register_buffer(name, buf)

    # --- configuration, read-only views of the spec --------------------------------------------------
    dtype = property(lambda self: self.spec.dtype)
    qscheme = property(lambda self: self.spec.qscheme)
    reduce_range = property(lambda self: self.spec.reduce_range)
    eps = property(lambda self: self.spec.eps)

    # --- state views -----------------------------------------------------------------------------------
    @property
    def min_val(self) -> torch.Tensor | None:
        """Min of the finite values seen (per channel: ``(C,)``); ``None`` before any data."""
        return self.running_min if self._observed() else None

    @property
    def max_val(self) -> torch.Tensor | None:
        """Max of the finite values seen (per channel: ``(C,)``); ``None`` before any data."""
        return self.running_max if self._observed() else None

    @property
    def nonfinite_count(self) -> int:
        """How many NaN / +-Inf values were seen and excluded (reads the device)."""
        return int(self.seen[Seen.NONFINITE])

    def range_state(self) -> RangeState:
        """The running range and ``seen`` as a ``RangeState`` (views of the buffers)."""
        return RangeState(*(self._buffers[name] for name in RangeState._fields))

    def _observed(self) -> bool:
        """Whether any non-empty batch was observed (also one with nothing finite)."""
        return bool(self.seen[Seen.BATCHES] > 0)

    def _has_finite(self) -> bool:
        """Whether any finite value was observed."""
        return bool(self.seen[Seen.FINITE] > 0)

    # --- the interface -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` and return it unchanged.

        Raises:
            TypeError: ``x`` is not a tensor of float16, bfloat16, float32 or float64.
            ValueError: ``x`` is on another device than the observer's buffers (move the observer with
                ``.to(device)``, as any module), or a per-channel observer got a tensor without its channel
                axis, or a different number of channels than before.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"observers take a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"cannot observe a tensor of dtype {x.dtype}; observers take float16, bfloat16, float32 "
                "or float64 tensors"
            )
        if x.device != self.seen.device:
            raise ValueError(
                f"x is on {x.device} but this observer's buffers are on {self.seen.device}; "
                f"move the observer first: observer.to({str(x.device)!r})"
            )
        if x.numel() == 0:
            return x
        # no torch.no_grad() needed (1.5 us a call): x is detached and no buffer requires grad
        self._observe(x.detach())
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int32) from the statistics: 0-d, or ``(C,)`` per channel.

        Raises:
            RuntimeError: nothing was observed, or nothing finite was.
        """
        self._check_finite_seen()
        lo, hi = self._range()
        return calculate_qparams(lo, hi, self.spec)

    def reset(self) -> None:
        """Forget every statistic; the configuration stays."""
        self.running_min.fill_(float("inf"))
        self.running_max.fill_(float("-inf"))
        self.seen.zero_()

    # --- what subclasses implement -------------------------------------------------------------------
    def _observe(self, x: torch.Tensor) -> None:
        if self.ch_axis is None:
            ops.minmax_update_(x, self.range_state(), self.averaging_constant, backend=self.backend)
            return
        axis = self._channel_axis(x)
        ops.minmax_per_channel_update_(
            x, axis, self.range_state(), self.averaging_constant, backend=self.backend
        )

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.running_min, self.running_max

    # --- helpers ---------------------------------------------------------------------------------------
    def _check_finite_seen(self) -> None:
        finite, nonfinite = int(self.seen[Seen.FINITE]), int(self.seen[Seen.NONFINITE])
        if finite == 0 and nonfinite == 0:
            raise RuntimeError(
                f"{type(self).__name__} has observed no data yet; "
                "call it on tensors before calculate_qparams()"
            )
        if finite == 0:
            raise RuntimeError(
                f"{type(self).__name__} observed {nonfinite} values and none was finite (NaN or +-Inf), "
                "so there is no range to quantize"
            )

    def _channel_axis(self, x: torch.Tensor) -> int:
        """The channel axis of ``x`` as a non-negative int; sizes the per-channel buffers on first use."""
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a tensor of shape {tuple(x.shape)}")
        axis = self.ch_axis % x.dim()
        channels = x.shape[axis]
        if self.running_min.numel() == 0:
            # first data fixes the channel count; the shape is known on the host, nothing is read
            self.running_min.resize_(channels).fill_(float("inf"))
            self.running_max.resize_(channels).fill_(float("-inf"))
        elif self.running_min.numel() != channels:
            raise ValueError(
                f"{type(self).__name__} has {self.running_min.numel()} channels "
                f"along ch_axis={self.ch_axis}, "
                f"got a tensor of shape {tuple(x.shape)} with {channels}; reset() it to observe another layer"
            )
        return axis

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; .half() / .double() must not change their dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel buffers start empty and take their size from the state being loaded
        for name in ("running_min", "running_max"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != self._buffers[name].shape:
                if self.ch_axis is not None and self._buffers[name].numel() == 0:
                    self._buffers[name].resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = [f"dtype={self.dtype}", f"qscheme={self.qscheme!r}"]
        if self.reduce_range:
            parts.append("reduce_range=True")
        if self.eps != _EPS:
            parts.append(f"eps={self.eps}")
        if self.ch_axis is not None:
            parts.append(f"ch_axis={self.ch_axis}")
        if self.averaging_constant is not None:
            parts.append(f"averaging_constant={self.averaging_constant}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def _check_averaging_constant(c) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
        raise ValueError(f"averaging_constant={c!r} must be a number with 0 < averaging_constant <= 1")
    return float(c)


def _check_ch_axis(ch_axis) -> int:
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
        raise ValueError(f"ch_axis={ch_axis!r} must be an int")
    return ch_axis


class MinMaxObserver(ObserverBase):
    """Range = the min and max of every finite value seen. Exact, cheap; sensitive to outliers.

    Args:
        dtype: ``torch.qint8`` (default), ``torch.quint8``, ``torch.int8``, ``torch.uint8``,
            ``torch.int4``, ``torch.uint4``.
        qscheme: ``"affine"`` (default) or ``"symmetric"`` (or a ``torch.per_*`` constant).
        reduce_range: drop one bit of the integer range.
        eps: smallest scale.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``mono_quant.ops``).
    """


class MovingAverageMinMaxObserver(ObserverBase):
    """Range = exponential moving average of each batch's finite min and max.

    The first batch with a finite value sets the range; each later one applies
    ``new = (1 - c) * old + c * batch`` to both ends. Smooths away outlier batches.

    Args:
        averaging_constant: ``c``, with ``0 < c <= 1`` (default 0.01).
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.

    Raises:
        ValueError: ``averaging_constant`` outside ``(0, 1]``.
    """

    def __init__(self, averaging_constant: float = 0.01, **kwargs):
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        super().__init__(**kwargs)


class PerChannelMinMaxObserver(ObserverBase):
    """``MinMaxObserver`` for each channel along ``ch_axis``: ``scale``/``zero_point`` of shape ``(C,)``.

    Args:
        ch_axis: the channel dimension (default 0; negative counts from the end, ``-1`` for
            ``[tokens, hidden]`` activations).
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.
    """

    def __init__(self, ch_axis: int = 0, **kwargs):
        self.ch_axis = _check_ch_axis(ch_axis)
        super().__init__(**kwargs)


class MovingAveragePerChannelMinMaxObserver(ObserverBase):
    """``MovingAverageMinMaxObserver`` for each channel along ``ch_axis``.

    Args:
        averaging_constant: ``0 < c <= 1`` (default 0.01). ch_axis: the channel dimension (default 0).
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.
    """

    def __init__(self, averaging_constant: float = 0.01, ch_axis: int = 0, **kwargs):
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        self.ch_axis = _check_ch_axis(ch_axis)
        super().__init__(**kwargs)


class HistogramObserver(ObserverBase):
    """Exact histogram of every finite value seen; the range is chosen by a threshold search.

    The histogram lives on the canonical power-of-two grid of ``mono_quant.grid``: feeding the
    same values in any batching and order gives identical counts and edges, counts are int64, memory is
    bounded by ``bins``, and the bin width is never coarser than ``(max - min) / bins``.

    Args:
        bins: resolution guarantee, a positive int (default 2048); ``2 * bins + 2`` bins are held.
        method: ``"kl"`` (entropy calibration as in TensorRT / ModelOpt), ``"mse"`` or ``"percentile"``.
        percentile: for ``method="percentile"``, in ``(0, 100]`` (default 99.99).
        dtype, qscheme, reduce_range, eps, backend: as for ``MinMaxObserver``.

    Raises:
        ValueError: bad ``bins``, ``method`` or ``percentile``.
    """

    def __init__(self, bins: int = 2048, method: str = "kl", percentile: float = 99.99, **kwargs):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins={bins!r} must be a positive int")
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"method={method!r} is not one of {', '.join(map(repr, HISTOGRAM_METHODS))}")
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 0 < percentile <= 100
        ):
            raise ValueError(f"percentile={percentile!r} must be a number in (0, 100]")
        super().__init__(**kwargs)
        self.bins = bins
        self.method = method
        self.percentile = float(percentile)
        empty = HistogramState.empty(grid.internal_bins(bins))
        for name in HistogramState._fields[len(RangeState._fields) :]:
            self.register_buffer(name, getattr(empty, name))

    @property
    def histogram_counts(self) -> torch.Tensor | None:
        """int64 counts of the ``2 * bins + 2`` bins; ``None`` before any finite value."""
        return self.counts if self._has_finite() else None

    @property
    def bin_edges(self) -> torch.Tensor | None:
        """float64 edges (``len(histogram_counts) + 1``, exact); ``None`` before any finite value."""
        if not self._has_finite():
            return None
        return grid.bin_edges(self.exponent, self.origin, self.counts.shape[0])

    def state(self) -> HistogramState:
        """The histogram as a ``HistogramState`` (views of the buffers), e.g. for ``merge_histograms``."""
        return HistogramState(*(self._buffers[name] for name in HistogramState._fields))

    def reset(self) -> None:
        super().reset()
        self.exponent.fill_(grid.E_MIN)
        self.origin.zero_()
        self.counts.zero_()

    def _observe(self, x: torch.Tensor) -> None:
        ops.histogram_update_(x, self.state(), backend=self.backend)

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
