"""The observer kinds: MinMax, moving average, per-channel variants and the histogram.

See ``mono_quant.core.base`` for what they share; ``mono_quant.core.registry`` names them.
"""

from __future__ import annotations

import numpy as np
import torch

from mono_quant.core.base import EMA_RULES, RANGE_RULES, ObserverBase, StateError
from mono_quant.core.search import HISTOGRAM_METHODS, search_range
from mono_quant.grid import E_MAX, E_MIN, MAX_BINS, bin_edges, bin_index, canonical_grid, internal_bins
from mono_quant.history import AMAX_ALGOS, AmaxHistoryState, amax_scale
from mono_quant.ops import amax_history_update_, histogram_segments_update_, histogram_update_
from mono_quant.state import HistogramState, RangeState, Seen

__all__ = [
    "AmaxHistoryObserver",
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
            ``torch.int4``, ``torch.uint4``, or FP8: ``torch.float8_e4m3fn``, ``float8_e5m2``,
            ``float8_e4m3fnuz``, ``float8_e5m2fnuz``.
        qscheme: ``"affine"`` or ``"symmetric"`` (or a ``torch.per_*`` constant); default affine for the
            integer types, symmetric for FP8 (which takes nothing else).
        reduce_range: drop one bit of the integer range.
        eps: smallest scale, a float32 between the smallest normal float32 and its max.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``mono_quant.ops``).
        margin: FP8 only, an int from 0 to 127: the scale is ``2**margin`` times larger (``QuantSpec``).
    """


class MovingAverageMinMaxObserver(ObserverBase):
    """Range = exponential moving average of each batch's finite min and max.

    The first batch with a finite value sets the range; each later one applies
    ``new = (1 - c) * old + c * batch`` to both ends (``c = 1``: the last batch's range). Smooths away
    outlier batches.

    Args:
        averaging_constant: ``c``, with ``0 < c <= 1`` (default 0.01).
        dtype, qscheme, reduce_range, eps, backend, margin: as for ``MinMaxObserver``.

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
        dtype, qscheme, reduce_range, eps, backend, margin: as for ``MinMaxObserver``.
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
        dtype, qscheme, reduce_range, eps, backend, margin: as for ``MinMaxObserver``.
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
        dtype, qscheme, reduce_range, eps, backend, margin: as for ``MinMaxObserver``.

    Raises:
        ValueError: bad ``bins``, ``method`` or ``percentile``.
    """

    MERGE_RULES = {**RANGE_RULES, "exponent": "grid", "origin": "grid", "counts": "counts"}
    SEGMENT_FIELDS = HistogramState._fields

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

    def check_state(self, buffers: dict[str, torch.Tensor] | None = None) -> None:
        """``ObserverBase.check_state``, and the histogram's own: the exponent in ``[E_MIN, E_MAX]``, the
        origin within float32's exact integers, counts >= 0 summing to the finite values seen, all of them in
        the bins of the range, on the canonical grid of that range."""
        if {**self._buffers, **(buffers or {})}["seen"].dim() == 2:  # segmented: each segment alone
            return super().check_state(buffers)
        super().check_state(buffers)
        b = {n: t.detach().cpu() for n, t in {**self._buffers, **(buffers or {})}.items() if t is not None}
        e, origin, counts = int(b["exponent"]), int(b["origin"]), b["counts"]
        lo, hi, finite = b["running_min"], b["running_max"], int(b["seen"][Seen.FINITE])
        if not E_MIN <= e <= E_MAX:
            raise StateError(
                "exponent", f"{e} is outside [{E_MIN}, {E_MAX}] (2**-e must be a normal float32)"
            )
        if not -(1 << 24) <= origin < 1 << 24:
            raise StateError(
                "origin", f"{origin} is outside [-2**24, 2**24): grid bin numbers stay below 2**24"
            )
        if bool((counts < 0).any()):
            raise StateError("counts", "holds negative counts")
        total = int(counts.sum())
        if total != finite:
            raise StateError("counts", f"sum to {total} but seen counts {finite} finite values")
        want = tuple(int(v) for v in canonical_grid(lo, hi, counts.shape[0]))
        if (e, origin) != want:
            raise StateError(
                "exponent/origin",
                f"(exponent {e}, origin {origin}) is not the canonical grid of the range [{float(lo)}, "
                f"{float(hi)}] (exponent {want[0]}, origin {want[1]})",
            )
        if finite:
            first, last = (int(bin_index(v.reshape(1), b["exponent"], b["origin"])) for v in (lo, hi))
            inside = 0 <= first <= last < counts.shape[0]
            if (
                not inside
                or counts[first] == 0
                or counts[last] == 0
                or int(counts[first : last + 1].sum()) != total
            ):
                raise StateError(
                    "counts",
                    f"counts lie outside the bins of running_min / running_max ({first} to {last}), or those "
                    "bins are empty (the min and max are values that were counted)",
                )

    @property
    def histogram_counts(self) -> torch.Tensor | None:
        """int64 counts of the ``2 * bins + 2`` bins; ``None`` before any finite value."""
        return self.counts if self._has_finite() else None

    @property
    def bin_edges(self) -> torch.Tensor | None:
        """float64 edges (``len(histogram_counts) + 1``, exact); ``None`` before any finite value.

        Raises:
            ValueError: a segmented observer (each segment has its grid: ``segment(e).bin_edges``).
        """
        if self.num_segments is not None:
            raise ValueError(f"this histogram holds {self.num_segments} segments: use segment(e).bin_edges")
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

    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        histogram_update_(x, self.state(), mask=mask, backend=self.backend)

    def _observe_segments(self, x: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor | None) -> None:
        histogram_segments_update_(
            x,
            segments,
            self.state(),
            self.tokens_seen,
            self.invalid_segments,
            mask=mask,
            backend=self.backend,
        )

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = search_range(
            self.counts,
            self.exponent,
            self.origin,
            self.method,
            symmetric=self.qscheme == "symmetric",
            levels=self.spec.levels,
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


def _distributed(group) -> bool:
    """Whether a process group of more than one rank is initialized (``reduce_amax``)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _algo_name(algo) -> str:
    """How settings name an ``amax_compute_algo``: itself, or ``"callable:module.qualname"``."""
    if isinstance(algo, str):
        return algo
    name = getattr(algo, "__qualname__", type(algo).__qualname__)
    return f"callable:{getattr(algo, '__module__', '?')}.{name}"


class AmaxHistoryObserver(ObserverBase):
    """TransformerEngine's delayed scaling as an observer: a history of batch amaxes and the scale from it.

    Each ``forward(x)`` with batch amax ``a = max(|finite values of x|)`` (0 if none; NaN / Inf counted and
    excluded) does, on the device and without a host read (one kernel launch on CUDA)::

        amax_history = roll(amax_history, 1); amax_history[0] = a
        amax = max(amax_history)  |  a  |  amax_compute_algo(amax_history)
        delayed_scale = scale
        scale = max(eps, amax * 2**margin / fp8_max)   where amax > 0 and finite; else scale stays

    (integer dtypes: the symmetric formula, ``amax / ((qmax - qmin) / 2)``; the scale saturates at the
    float32 max). Slots no batch has filled hold 0; the scales start at 1.0. ``calculate_qparams()``
    returns ``(scale, zero_point)``, the scale for the next step; ``delayed_qparams()`` the one the latest
    batch was quantized with under delayed scaling (computed before it).

    Args:
        history_len: slots of the history, an int >= 1 (default 1024).
        amax_compute_algo: ``"max"`` (default), ``"most_recent"``, or a callable taking the float32
            ``(history_len,)`` history (most recent first) and returning a 0-d (or one-element) tensor on its
            device (called in ``forward``: keep it free of host reads for CUDA graphs).
        margin: an int from 0 to 127 (default 0); FP8 only.
        dtype: ``torch.float8_e4m3fn`` (default), another FP8 dtype, or an integer one (symmetric).
        qscheme: ``"symmetric"`` or ``None``. eps, backend: as for ``MinMaxObserver``.
        reduce_amax: TransformerEngine's ``reduce_amax``: after each step, the batch's amax is reduced with
            MAX across the ranks of ``group`` (one ``all_reduce`` of 4 bytes, no host read) and the scale is
            recomputed, so every rank holds the same history and scale. Every rank must step the observer
            the same number of times (as for any collective). Off, or without an initialized process group
            of more than one rank, nothing is communicated; ``sync_observers`` after a step does the same
            with its checks (and host reads). A runtime option, like ``backend``: not among ``settings()``.
        group: the process group of ``reduce_amax`` (default: the world).

    Raises:
        ValueError: bad ``history_len``, ``amax_compute_algo``, ``margin``, or ``qscheme="affine"``; a
            callable that returns a non-scalar or a non-float tensor (on the call that does).
    """

    MERGE_RULES = {**RANGE_RULES, "amax_history": "max", "scale": "derived"}
    SEGMENTED = False  # one history per tensor: a step is a batch, not a set of rows

    def __init__(
        self,
        history_len: int = 1024,
        amax_compute_algo="max",
        margin: int = 0,
        dtype: torch.dtype = torch.float8_e4m3fn,
        qscheme=None,
        reduce_amax: bool = False,
        group=None,
        **kwargs,
    ):
        if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len={history_len!r} must be an int >= 1")
        if not callable(amax_compute_algo) and amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(
                f"amax_compute_algo={amax_compute_algo!r} is not one of {', '.join(map(repr, AMAX_ALGOS))} "
                "or a callable on the history"
            )
        if qscheme is not None and qscheme not in ("symmetric", torch.per_tensor_symmetric):
            raise ValueError(f"qscheme={qscheme!r}: AmaxHistoryObserver is symmetric; leave qscheme unset")
        super().__init__(dtype=dtype, qscheme="symmetric", margin=margin, **kwargs)
        self.history_len = history_len
        self.amax_compute_algo = amax_compute_algo
        self.reduce_amax = bool(reduce_amax)
        self.group = group
        empty = AmaxHistoryState.empty(history_len)
        for name in AmaxHistoryState._fields[len(RangeState._fields) :]:
            self.register_buffer(name, getattr(empty, name), persistent=name != "ticket")
        spec = self.spec
        self._divisor = spec.fp8_max if spec.is_fp8 else float(spec.qmax - spec.qmin) / 2
        self._multiplier = float(2**spec.margin)

    def settings(self) -> dict:
        return {
            **super().settings(),
            "history_len": self.history_len,
            "amax_compute_algo": _algo_name(self.amax_compute_algo),
        }

    def history_state(self) -> AmaxHistoryState:
        """The buffers as an ``AmaxHistoryState`` (views)."""
        return AmaxHistoryState(*(self._buffers[name] for name in AmaxHistoryState._fields))

    def _zero_point(self) -> torch.Tensor:
        zp = 0 if self.spec.signed else (self.spec.qmax - self.spec.qmin + 1) // 2
        return torch.full((), zp, dtype=torch.int32, device=self.scale.device)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the next step: 0-d float32 and int32 (zero point 0 but for the
        unsigned integer types).

        Raises:
            RuntimeError: nothing was observed yet.
        """
        if int(self.seen[Seen.BATCHES]) == 0:
            raise RuntimeError(
                "AmaxHistoryObserver has observed no data yet; call it on tensors before calculate_qparams()"
            )
        return self.scale.clone(), self._zero_point()

    def delayed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(delayed_scale, zero_point)``: the qparams from before the latest batch (delayed scaling)."""
        return self.delayed_scale.clone(), self._zero_point()

    def device_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_qparams()`` without its check: no host read (``FakeQuantize`` uses it)."""
        return self.scale, self._zero_point()

    def reset(self) -> None:
        super().reset()
        self.amax_history.zero_()
        self.scale.fill_(1.0)
        self.delayed_scale.fill_(1.0)
        self.ticket.zero_()

    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        algo = self.amax_compute_algo
        state = self.history_state()
        consts = (self._multiplier, self._divisor, self.eps)
        if not callable(algo):
            amax_history_update_(x, state, algo, *consts, mask=mask, backend=self.backend)
        else:
            amax_history_update_(x, state, "none", *consts, mask=mask, backend=self.backend)
            self.scale.copy_(amax_scale(self._call_algo(), self.scale, *consts))
        if self.reduce_amax and _distributed(self.group):
            # the older slots agree already; MAX of the newest, then the scale of the reduced history (where
            # the reduced amax is 0 every rank's amax was 0 and the scale stayed on every rank)
            torch.distributed.all_reduce(self.amax_history[:1], torch.distributed.ReduceOp.MAX, self.group)
            self._merged()

    def _call_algo(self) -> torch.Tensor:
        amax = self.amax_compute_algo(self.amax_history)
        if not isinstance(amax, torch.Tensor) or amax.numel() != 1 or not amax.is_floating_point():
            got = f"a tensor of shape {tuple(amax.shape)}" if isinstance(amax, torch.Tensor) else repr(amax)
            raise ValueError(
                f"amax_compute_algo={_algo_name(self.amax_compute_algo)} must return a float tensor with one "
                f"element (the amax), got {got}"
            )
        return amax.reshape(()).to(torch.float32)

    def _merged(self) -> None:
        """After a merge of the histories: the scale of the merged history."""
        algo = self.amax_compute_algo
        if callable(algo):
            amax = self._call_algo()
        else:
            amax = self.amax_history.amax() if algo == "max" else self.amax_history[0]
        self.scale.copy_(amax_scale(amax, self.scale, self._multiplier, self._divisor, self.eps))

    def extra_repr(self) -> str:
        algo = _algo_name(self.amax_compute_algo)
        return f"history_len={self.history_len}, amax_compute_algo={algo!r}, {super().extra_repr()}"
