"""Segmented observers (MoE experts): one observer keeps E sets of statistics.

``obs(x, segments=idx, num_segments=E)`` routes the rows of ``x`` (``x.shape[0]``; observe ``[batch, seq,
hidden]`` activations as ``x.reshape(-1, hidden)``) to segments: ``idx`` is an integer tensor ``[N]`` or
``[N, k]`` (top-k routing; a row counts once for every segment it lists). The first such call fixes ``E``:
every state tensor gains a leading ``E`` dim (``running_min`` / ``running_max`` ``(E,)`` or ``(E, C)``,
``seen`` ``(E, 4)``, a histogram's ``exponent`` / ``origin`` ``(E,)`` and ``counts`` ``(E, B)``), and two
buffers appear: ``tokens_seen`` (int64 ``(E,)``, rows routed to each segment that were not wholly masked:
``obs.tokens_seen == 0`` marks the empty experts) and ``invalid_segments`` (int64 ``()``, routing entries
outside ``[0, E)``; on the CPU those are an error, on CUDA they are dropped and counted there, with no
host read: check ``obs.invalid_segment_count`` after calibration). Segment ``e`` then holds exactly the
state a plain observer of the same kind would hold after seeing the rows routed to ``e``
(``segment(e)`` returns that observer). ``reset()`` forgets ``E`` too.

Segmented kinds: MinMax, moving average, per-channel (``ch_axis`` not 0) and moving-average per-channel
(on CUDA one kernel launch a call, ``mono_quant.kernels.segments``, no host read), histogram (every method;
per segment the histogram update of its rows; on CUDA three launches a call, ``kernels.segment_histogram``,
no host read), channel statistics (``ChannelStatsObserver``: its float64 sums and counts ``(E, C)``; on
the CPU per segment the channel-stats update of its rows, on CUDA sync-free, the float64 sums added in
another order than the CPU's: equal to within float64 rounding).
The amax history and the block observer refuse (``NotImplementedError``).
"""

from __future__ import annotations

import torch

from mono_quant.core.checks import StateError
from mono_quant.grid import E_MIN

__all__ = [
    "SEGMENT_BUFFERS",
    "check_segments",
    "make_segmented",
    "segment_observer",
    "segmented_qparams",
    "unsegment",
]

SEGMENT_BUFFERS = ("tokens_seen", "invalid_segments")
_FILLS = {"running_min": float("inf"), "running_max": float("-inf"), "exponent": E_MIN}
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_segments(obs, x: torch.Tensor, segments, num_segments, mask) -> None:
    """Check a segmented call before anything changes.

    Raises:
        NotImplementedError: the observer's kind has no segmented observation.
        TypeError: ``segments`` is not an integer tensor.
        ValueError: one of ``segments`` / ``num_segments`` without the other, ``num_segments`` not a
            positive int or not the ``E`` of earlier calls, an observer that saw unsegmented data, a shape
            of ``segments`` other than ``[N]`` / ``[N, k]`` with ``N = x.shape[0]``, another device, a
            per-channel axis that is the rows' axis or another channel count, or (on the CPU) routing
            entries outside ``[0, num_segments)``.
    """
    name = type(obs).__name__
    if not obs.SEGMENTED:
        raise NotImplementedError(
            f"{name} does not observe segments; segmented observation (segments=, num_segments=) is for "
            "MinMax, moving-average, per-channel and histogram observers"
        )
    if segments is None or num_segments is None:
        raise ValueError("pass segments= and num_segments= together (segments: [N] or [N, k] ints)")
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments={num_segments!r} must be a positive int")
    if obs.num_segments is not None and obs.num_segments != num_segments:
        raise ValueError(
            f"num_segments={num_segments} but this {name} observes {obs.num_segments} segments (fixed at its "
            "first segmented call); reset() forgets them"
        )
    if obs.num_segments is None and obs._observed():
        raise ValueError(f"this {name} observed tensors without segments; reset() it before segmenting")
    if not isinstance(segments, torch.Tensor) or segments.dtype not in _INDEX_DTYPES:
        got = segments.dtype if isinstance(segments, torch.Tensor) else type(segments).__name__
        raise TypeError(f"segments must be an integer tensor (int64 [N] or [N, k]), got {got}")
    if x.dim() == 0 or segments.dim() not in (1, 2) or segments.shape[0] != x.shape[0]:
        raise ValueError(
            f"segments of shape {tuple(segments.shape)} do not route x of shape {tuple(x.shape)}: they must "
            "be [N] or [N, k] with N = x.shape[0], the rows (observe [batch, seq, hidden] as "
            "x.reshape(-1, hidden))"
        )
    if segments.device != x.device:
        raise ValueError(f"segments are on {segments.device} but x is on {x.device}; move them to x.device")
    if mask is not None and mask.dim() > x.dim():
        raise ValueError(f"mask of shape {tuple(mask.shape)} has more dims than x {tuple(x.shape)}")
    if obs.ch_axis is not None:
        if not -x.dim() <= obs.ch_axis < x.dim():
            raise ValueError(f"ch_axis={obs.ch_axis} is out of range for a tensor of shape {tuple(x.shape)}")
        axis = obs.ch_axis % x.dim()
        if axis == 0:
            raise ValueError(
                f"ch_axis={obs.ch_axis} is the rows' axis of x {tuple(x.shape)}; a segmented per-channel "
                "observer keeps channels along another axis (ch_axis=-1 for [tokens, hidden])"
            )
        if obs.num_segments is not None and obs.running_min.shape[1] != x.shape[axis]:
            raise ValueError(
                f"{name} has {obs.running_min.shape[1]} channels along ch_axis={obs.ch_axis}, got x of shape "
                f"{tuple(x.shape)}"
            )
        if obs.num_channels is not None and obs.num_channels != x.shape[axis]:
            raise ValueError(f"num_channels={obs.num_channels} was given, got x of shape {tuple(x.shape)}")
    if segments.device.type == "cpu" and segments.numel():
        bad = (segments < 0) | (segments >= num_segments)
        if bool(bad.any()):
            at = [int(i) for i in torch.nonzero(bad)[0]]
            raise ValueError(
                f"segments must lie in [0, num_segments) = [0, {num_segments}), got "
                f"{int(segments[tuple(at)])} at segments{at} ({int(bad.sum())} entries outside)"
            )


def _unsegmented_shape(obs, name: str, shape: torch.Size) -> tuple[int, ...]:
    if obs.ch_axis is not None and name in obs.CHANNEL_FIELDS:
        return (obs.num_channels or 0,)
    return tuple(shape)


def make_segmented(obs, num_segments: int, channels: int | None) -> None:
    """Give every state buffer a leading ``num_segments`` dim, blank (``channels``: a per-channel
    observer's channel count), and add ``tokens_seen`` / ``invalid_segments``."""
    dev = obs.seen.device
    for name in obs.SEGMENT_FIELDS:
        buf = obs._buffers[name]
        if obs.ch_axis is not None and name in obs.CHANNEL_FIELDS:
            inner = (channels,)
        else:
            inner = tuple(buf.shape[1:]) if obs.num_segments is not None else tuple(buf.shape)
        obs._buffers[name] = torch.full(
            (num_segments, *inner), _FILLS.get(name, 0), dtype=buf.dtype, device=dev
        )
    obs.register_buffer("tokens_seen", torch.zeros(num_segments, dtype=torch.int64, device=dev))
    obs.register_buffer("invalid_segments", torch.zeros((), dtype=torch.int64, device=dev))


def unsegment(obs) -> None:
    """Back to a plain, blank observer: the state buffers lose their ``E`` dim, the segment buffers go."""
    for name in obs.SEGMENT_FIELDS:
        buf = obs._buffers[name]
        shape = _unsegmented_shape(obs, name, buf.shape[1:])
        obs._buffers[name] = torch.full(shape, _FILLS.get(name, 0), dtype=buf.dtype, device=buf.device)
    for name in SEGMENT_BUFFERS:
        obs._buffers.pop(name, None)


def segment_observer(obs, e: int):
    """A new plain observer of ``obs``'s class and settings holding segment ``e``'s state (copies).

    Raises:
        ValueError: ``obs`` is not segmented, or ``e`` is not in ``[0, E)``.
    """
    num = obs.num_segments
    if num is None:
        raise ValueError(f"this {type(obs).__name__} is not segmented (call it with segments= first)")
    if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num:
        raise ValueError(f"segment {e!r} is not an int in [0, {num})")
    out = type(obs)(**obs.settings(), backend=obs.backend)
    for name in obs.SEGMENT_FIELDS:
        out._buffers[name] = obs._buffers[name][e].clone()
    return out


def segmented_qparams(obs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of every segment, stacked: ``(E,)`` or ``(E, C)``.

    Raises:
        RuntimeError: some segment saw no finite value (they are named; ``obs.tokens_seen == 0`` marks the
            segments that got no row, ``segment(e)`` gives one segment alone).
    """
    finite = obs.seen[:, 0].cpu()
    empty = torch.nonzero(finite == 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:8])) + (", ..." if len(empty) > 8 else "")
        raise RuntimeError(
            f"{type(obs).__name__}: {len(empty)} of {obs.num_segments} segments saw no finite value "
            f"(segments {shown}), so they have no range to quantize; obs.tokens_seen == 0 marks those that "
            "got no row: choose their qparams (e.g. merge_observers of sibling segments, obs.segment(e))"
        )
    pairs = [segment_observer(obs, e).calculate_qparams() for e in range(obs.num_segments)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def check_segmented_state(obs, b: dict) -> None:
    """``check_state`` of a segmented state ``b`` (buffer name -> tensor): the segment buffers' shapes and
    counts, then every segment as a plain state."""
    num = b["seen"].shape[0]
    tokens, invalid = b.get("tokens_seen"), b.get("invalid_segments")
    if tokens is None or tokens.shape != (num,) or invalid is None or invalid.shape != ():
        raise StateError("tokens_seen", f"a segmented state of {num} segments holds tokens_seen ({num},)")
    if bool((tokens < 0).any()) or int(invalid) < 0:
        raise StateError("tokens_seen", "holds negative counts")
    for name in obs.SEGMENT_FIELDS:
        if b[name].shape[:1] != (num,):
            raise StateError(name, f"must have a leading dim of {num} segments, got {tuple(b[name].shape)}")
    for e in range(num):
        obs.check_state({name: b[name][e] for name in obs.SEGMENT_FIELDS})
