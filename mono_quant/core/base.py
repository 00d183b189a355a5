"""The observer interface and what every observer shares: buffers, checks, saved state.

Every observer shares one interface: ``forward(x, mask=None)`` observes ``x`` (under a token mask: only
the values where ``mask`` is True) and returns it unchanged (so it can sit inline in a model or in a forward
hook), ``calculate_qparams()`` returns ``(scale, zero_point)`` and
``reset()`` forgets everything. State lives in registered buffers, updated in place: ``.to(device)``,
``state_dict()`` / ``load_state_dict()`` work, and ``.half()`` / ``.double()`` move the buffers without
changing their dtype (statistics stay float32, counts int64). The statistics come from ``mono_quant.ops``,
which picks the Triton kernels or the torch reference per call; observers never look at the device, and
``forward`` never reads a tensor value on the host.

Each observer class declares what the layers above need, so that a new kind is one class in
``observers.py`` (plus its ops / reference / kernel triple) and a name in ``registry.py``:

- ``settings()``: the constructor keywords that rebuild it (saved files, merge checks, ``_extra_state``);
- ``MERGE_RULES``: how each buffer merges across ranks or saved runs (``mono_quant.distributed``).
"""

from __future__ import annotations

import torch
from torch import nn

from mono_quant.core import segments as _seg
from mono_quant.core.checks import StateError, _decode, _encode, check_mask, check_range_state
from mono_quant.core.checks import check_input as _check_input
from mono_quant.core.qparams import QuantSpec, calculate_qparams, dtype_name
from mono_quant.ops import (
    check_backend,
    minmax_per_channel_update_,
    minmax_segments_update_,
    minmax_update_,
)
from mono_quant.state import RangeState, Seen, SegmentState

__all__ = ["StateError", "EMA_RULES", "RANGE_RULES", "ObserverBase", "check_mask"]

_EPS = torch.finfo(torch.float32).eps

# How a buffer merges (``mono_quant.distributed``): "min" / "max" / "sum" elementwise (a buffer other than the
# range in its own shape, agreed across sources); "ema" the mean of the sources' moving averages weighted by
# the batches each observed; "grid" the canonical grid of the merged range; "counts" histogram counts moved
# onto that grid and added; "derived" recomputed by the observer's ``_merged`` from the merged buffers.
RANGE_RULES = {"running_min": "min", "running_max": "max", "seen": "sum"}
EMA_RULES = {"running_min": "ema", "running_max": "ema", "seen": "sum"}


class ObserverBase(nn.Module):
    """What every observer has: a ``QuantSpec``, a backend, a running range and value counts.

    Buffers (a ``RangeState``):
        running_min, running_max: float32, ``()`` or ``(C,)`` per channel; ``+inf``/``-inf`` until data.
        seen: int64 ``(4,)``: finite values, non-finite values, batches observed, values masked out
            (``Seen``).

    Subclasses set ``ch_axis`` (``None`` per tensor) and ``averaging_constant`` (``None`` for a running
    min/max) or override ``_observe`` / ``_range``.
    """

    # _version 1: the first layout (running_min, running_max, seen[3]; histogram: exponent, origin, counts).
    # _version 2: the same buffers, and ``_extra_state`` with the class name and ``settings()``, checked on
    # load (a version-1 state dict still loads).
    # _version 3: ``seen`` gains the slot ``Seen.MASKED`` (values left out by a mask): ``(4,)``; a saved
    # ``(3,)`` seen (versions 1 and 2) loads with 0 masked values.
    _version = 3
    # segmented observation (``mono_quant.core.segments``): whether this kind takes ``segments=``, and the
    # buffers that gain the leading ``E`` dim
    SEGMENTED = True
    SEGMENT_FIELDS: tuple[str, ...] = RangeState._fields
    # the buffers of a per-channel observer (``ch_axis`` set) sized by the channel count: ``(C,)``, or
    # ``(E, C)`` segmented; the first batch (or a loaded state) sizes them when ``num_channels`` is unset
    CHANNEL_FIELDS: tuple[str, ...] = ("running_min", "running_max")
    ch_axis: int | None = None
    averaging_constant: float | None = None
    num_channels: int | None = None
    MERGE_RULES: dict[str, str] = RANGE_RULES

    def __init__(
        self,
        dtype: torch.dtype = torch.qint8,
        qscheme=None,
        reduce_range: bool = False,
        eps: float = _EPS,
        backend: str = "auto",
        margin: int = 0,
    ):
        super().__init__()
        self.spec = QuantSpec(dtype, qscheme, reduce_range, eps, margin)
        self.backend = check_backend(backend)
        channels = None if self.ch_axis is None else (self.num_channels or 0,)
        for name, buf in zip(RangeState._fields, RangeState.empty(channels or ()), strict=True):
            self.register_buffer(name, buf)

    # --- configuration, read-only views of the spec --------------------------------------------------
    dtype = property(lambda self: self.spec.dtype)
    qscheme = property(lambda self: self.spec.qscheme)
    reduce_range = property(lambda self: self.spec.reduce_range)
    eps = property(lambda self: self.spec.eps)
    margin = property(lambda self: self.spec.margin)

    def settings(self) -> dict:
        """The constructor keywords that rebuild this observer (``backend`` aside)."""
        out = {
            "dtype": self.dtype,
            "qscheme": self.qscheme,
            "reduce_range": self.reduce_range,
            "eps": self.eps,
        }
        if self.spec.is_fp8:  # integer observers save the settings they saved before FP8 existed
            out["margin"] = self.margin
        if self.averaging_constant is not None:
            out["averaging_constant"] = self.averaging_constant
        if self.ch_axis is not None:
            out["ch_axis"] = self.ch_axis
            if self.num_channels is not None:
                out["num_channels"] = self.num_channels
        return out

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
        """How many NaN / +-Inf values were seen and excluded (reads the device); masked ones are not
        counted here."""
        return int(self.seen[..., Seen.NONFINITE].sum())

    @property
    def masked_count(self) -> int:
        """How many values a ``mask`` left out (under ``False``) of every statistic (reads the device)."""
        return int(self.seen[..., Seen.MASKED].sum())

    @property
    def num_segments(self) -> int | None:
        """``E`` of a segmented observer (``mono_quant.core.segments``), ``None`` otherwise."""
        tokens = self._buffers.get("tokens_seen")
        return None if tokens is None else tokens.shape[0]

    @property
    def invalid_segment_count(self) -> int:
        """Routing entries outside ``[0, E)`` dropped on CUDA (reads the device; 0 if not segmented)."""
        invalid = self._buffers.get("invalid_segments")
        return 0 if invalid is None else int(invalid)

    def segment(self, e: int) -> ObserverBase:
        """A plain observer of this class and settings holding segment ``e``'s state (a copy)."""
        return _seg.segment_observer(self, e)

    def segment_state(self) -> SegmentState:
        """A segmented observer's state as a ``SegmentState`` (views of the buffers)."""
        return SegmentState(
            self.running_min, self.running_max, self.seen, self.tokens_seen, self.invalid_segments
        )

    def range_state(self) -> RangeState:
        """The running range and ``seen`` as a ``RangeState`` (views of the buffers)."""
        return RangeState(*(self._buffers[name] for name in RangeState._fields))

    def _observed(self) -> bool:
        """Whether any non-empty batch was observed (also one with nothing finite)."""
        return bool((self.seen[..., Seen.BATCHES] > 0).any())

    def _has_finite(self) -> bool:
        """Whether any finite value was observed."""
        return bool((self.seen[..., Seen.FINITE] > 0).any())

    # --- the interface -------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        segments: torch.Tensor | None = None,
        num_segments: int | None = None,
    ) -> torch.Tensor:
        """Observe ``x`` and return it unchanged.

        Args:
            x: the tensor observed.
            mask: ``None`` (every value), or a bool tensor of the leading dims of ``x``
                (``mask.shape == x.shape[:mask.dim()]``, e.g. ``[batch, seq]`` for ``[batch, seq, hidden]``
                activations): the values under ``False`` are left out of every statistic and counted in
                ``masked_count``; non-finite values are counted among the others only. A batch whose values
                are all masked changes nothing but ``masked_count``.
            segments, num_segments: a segmented observation (``mono_quant.core.segments``): the rows of
                ``x`` (``x.shape[0]``) routed by ``segments`` (integer ``[N]`` or ``[N, k]``) to ``E =
                num_segments`` sets of statistics, fixed at the first such call.

        Raises:
            TypeError: ``x`` is not a dense, strided tensor of float16, bfloat16, float32 or float64 with
                values (sparse, nested and meta tensors are refused); ``mask`` is not a bool tensor.
            ValueError: ``x`` (or ``mask``) is on another device than the observer's buffers (move the
                observer with ``.to(device)``, as any module), a ``mask`` of a shape that is not the leading
                dims of ``x``, or a per-channel observer got a tensor without its channel axis, or a
                different number of channels than before; bad ``segments`` / ``num_segments``
                (``core.segments.check_segments``). Nothing changes on any of these errors.
            NotImplementedError: ``segments`` for a kind that has no segmented observation.
        """
        _check_input(x)
        if x.device != self.seen.device:
            raise ValueError(
                f"x is on {x.device} but this observer's buffers are on {self.seen.device}; "
                f"move the observer first: observer.to({str(x.device)!r})"
            )
        if mask is not None:
            check_mask(x, mask)
        if segments is not None or num_segments is not None:
            _seg.check_segments(self, x, segments, num_segments, mask)
            if self.num_segments is None:
                axis = None if self.ch_axis is None else self.ch_axis % x.dim()
                _seg.make_segmented(self, num_segments, None if axis is None else x.shape[axis])
            if x.numel():
                self._observe_segments(x.detach(), segments, mask)
            return x
        if self.num_segments is not None:
            raise ValueError(
                f"this {type(self).__name__} is segmented ({self.num_segments} segments): pass segments= "
                f"and num_segments={self.num_segments}, or reset() it first"
            )
        if x.numel() == 0:
            return x
        # no torch.no_grad() needed (1.5 us a call): x is detached and no buffer requires grad
        if mask is None:
            self._observe(x.detach())
        else:
            self._observe(x.detach(), mask=mask)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int32) from the statistics: 0-d, or ``(C,)`` per channel.

        Raises:
            RuntimeError: nothing was observed, or nothing finite was (per channel: in some channel).
        """
        if self.num_segments is not None:
            return _seg.segmented_qparams(self)
        self._check_finite_seen()
        lo, hi = self._range()
        return calculate_qparams(lo, hi, self.spec)

    def reset(self) -> None:
        """Forget every statistic (a per-channel observer without ``num_channels`` also its channel
        count, a segmented one its segments); the configuration stays."""
        if self.num_segments is not None:
            _seg.unsegment(self)
        if self.ch_axis is not None and self.num_channels is None:
            self._resize_channels(0)
        self.running_min.fill_(float("inf"))
        self.running_max.fill_(float("-inf"))
        self.seen.zero_()

    # --- what subclasses implement -------------------------------------------------------------------
    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if self.ch_axis is None:
            minmax_update_(x, self.range_state(), self.averaging_constant, mask=mask, backend=self.backend)
            return
        axis, sized_now = self._channel_axis(x)
        try:
            minmax_per_channel_update_(
                x, axis, self.range_state(), self.averaging_constant, mask=mask, backend=self.backend
            )
        except BaseException:
            if sized_now:  # a failed first observation does not fix the channel count
                self._resize_channels(0)
            raise

    def _observe_segments(self, x: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor | None) -> None:
        axis = None if self.ch_axis is None else self.ch_axis % x.dim()
        minmax_segments_update_(
            x, segments, self.segment_state(), self.averaging_constant, ch_axis=axis, mask=mask,
            backend=self.backend,
        )  # fmt: skip

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.running_min, self.running_max

    def _merged(self) -> None:
        """Recompute the buffers whose rule is ``"derived"`` once the others are merged (none here)."""

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
        if self.ch_axis is not None:
            empty = torch.nonzero(~(self.running_min <= self.running_max)).flatten().tolist()
            if empty:
                shown = ", ".join(map(str, empty[:8])) + (", ..." if len(empty) > 8 else "")
                raise RuntimeError(
                    f"{type(self).__name__}: {len(empty)} of {self.running_min.numel()} channels saw no "
                    f"finite value (channels {shown}), so they have no range to quantize"
                )

    def _resize_channels(self, channels: int) -> None:
        self.running_min.resize_(channels).fill_(float("inf"))
        self.running_max.resize_(channels).fill_(float("-inf"))

    def _channel_axis(self, x: torch.Tensor) -> tuple[int, bool]:
        """The channel axis of ``x`` as a non-negative int, and whether this call sized the buffers."""
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a tensor of shape {tuple(x.shape)}")
        axis = self.ch_axis % x.dim()
        channels = x.shape[axis]
        if self.running_min.numel() == 0:
            # first data fixes the channel count; the shape is known on the host, nothing is read
            self._resize_channels(channels)
            return axis, True
        if self.running_min.numel() != channels:
            fix = (
                f"num_channels={self.num_channels} was given"
                if self.num_channels is not None
                else "reset() forgets the channel count, to observe another layer"
            )
            raise ValueError(
                f"{type(self).__name__} has {self.running_min.numel()} channels along "
                f"ch_axis={self.ch_axis}, got a tensor of shape {tuple(x.shape)} with {channels}; {fix}"
            )
        return axis, False

    def _apply(self, fn, recurse=True):
        # .to(device) moves the buffers; .half() / .double() must not change their dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    # --- saved state: the class and its settings travel with the buffers, and are checked on load --------
    def get_extra_state(self) -> torch.Tensor:
        """The class name and ``settings()`` as JSON bytes in a uint8 tensor: every value of the state dict
        stays a tensor (``.cpu()``, ``torch.load(weights_only=True)`` and comparisons keep working)."""
        return _encode({"class": type(self).__name__, "settings": self._saved_settings()})

    def _saved_settings(self) -> dict:
        settings = self.settings()
        settings["dtype"] = dtype_name(settings["dtype"])
        return settings

    def set_extra_state(self, state) -> None:
        saved = _decode(state)
        mine = {"class": type(self).__name__, "settings": self._saved_settings()}
        if saved.get("class") != mine["class"]:
            raise ValueError(
                f"cannot load the state of a {saved.get('class')} into a {mine['class']}; "
                f"create a {saved.get('class')} to load it"
            )
        theirs = saved["settings"]
        differ = {k for k in {*theirs, *mine["settings"]} if theirs.get(k) != mine["settings"].get(k)}
        if differ:
            what = ", ".join(
                f"{k}: saved {theirs.get(k)!r}, here {mine['settings'].get(k)!r}" for k in sorted(differ)
            )
            raise ValueError(
                f"cannot load into this {mine['class']}: the state was saved with other settings ({what}); "
                f"create it with the saved settings {theirs}"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._load_segments(state_dict, prefix)
        for name, buf in self._buffers.items():
            key = prefix + name
            if key not in state_dict:
                continue
            saved = state_dict[key]
            if name == "seen" and isinstance(saved, torch.Tensor) and saved.shape[-1:] == (Seen.SIZE - 1,):
                # saved before Seen.MASKED (_version < 3): no value was masked then
                saved = state_dict[key] = torch.cat([saved, saved.new_zeros((*saved.shape[:-1], 1))], -1)
            if not isinstance(saved, torch.Tensor) or saved.dtype != buf.dtype:
                got = saved.dtype if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise ValueError(f"cannot load {key}: it must be a {buf.dtype} tensor, got {got}")
            resizable = name in self.CHANNEL_FIELDS and self.ch_axis is not None
            if saved.shape != buf.shape:
                if not (resizable and buf.numel() == 0 and saved.dim() == 1):
                    raise ValueError(
                        f"cannot load {key} of shape {tuple(saved.shape)} into a {type(self).__name__} whose "
                        f"{name} has shape {tuple(buf.shape)}; was it saved from another kind of observer?"
                    )
                buf.resize_(saved.shape)  # per-channel buffers take their size from the state
        incoming = {n: state_dict[prefix + n] for n in self._buffers if prefix + n in state_dict}
        self.check_state(incoming)  # before anything is copied: a refused state changes nothing
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if (local_metadata or {}).get("version", 1) < 2:  # saved before _extra_state existed
            extra = prefix + "_extra_state"
            if extra in missing:
                missing.remove(extra)

    def _load_segments(self, state_dict, prefix) -> None:
        """Match the segmentation of a state about to be loaded (its ``tokens_seen``), blank."""
        tokens = state_dict.get(prefix + "tokens_seen")
        if not isinstance(tokens, torch.Tensor):
            if self.num_segments is not None:
                _seg.unsegment(self)
            return
        if tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise ValueError(f"cannot load {prefix}tokens_seen: it must be an int64 (E,) tensor")
        saved_min = state_dict.get(prefix + "running_min")
        channels = None
        if self.ch_axis is not None and isinstance(saved_min, torch.Tensor) and saved_min.dim() == 2:
            channels = saved_min.shape[1]
        if self.num_segments is not None:
            _seg.unsegment(self)
        _seg.make_segmented(self, tokens.shape[0], channels)

    def check_state(self, buffers: dict[str, torch.Tensor] | None = None) -> None:
        """Check what every observer state holds: ``seen`` counts that batches can give, and a range either
        finite with ``min <= max`` or ``+inf`` / ``-inf`` (nothing finite seen), consistent with ``seen``.

        Args:
            buffers: values to check in place of this observer's own buffers (a state about to be loaded).

        Raises:
            StateError: what is wrong, and in which buffer (``key``).
        """
        b = {n: t.detach().cpu() for n, t in {**self._buffers, **(buffers or {})}.items() if t is not None}
        seen = b["seen"]
        if seen.dim() == 2:
            _seg.check_segmented_state(self, b)
            return
        check_range_state(b)

    def extra_repr(self) -> str:
        parts = [f"dtype={self.dtype}", f"qscheme={self.qscheme!r}"]
        if self.reduce_range:
            parts.append("reduce_range=True")
        if self.eps != _EPS:
            parts.append(f"eps={self.eps}")
        if self.margin:
            parts.append(f"margin={self.margin}")
        if self.ch_axis is not None:
            parts.append(f"ch_axis={self.ch_axis}")
        if self.averaging_constant is not None:
            parts.append(f"averaging_constant={self.averaging_constant}")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
