"""How observers merge: each buffer packed by its class's rule, the packs reduced, the results unpacked.

The algorithm behind ``mono_quant.distributed`` (whose docstring states the rules and the collectives): pure
functions of the observers, with the reduction passed in (``all_reduce`` across ranks, or ``amin`` /
``amax`` / ``sum`` over a stack of the sources offline).
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from mono_quant.core.base import ObserverBase
from mono_quant.core.segments import make_segmented
from mono_quant.grid import regrid_to_range
from mono_quant.state import Seen

__all__ = ["Entries", "Gather", "Reduce", "collect", "merge"]

Entries = list[tuple[str, ObserverBase]]
# reduce(op, one buffer per source) -> the reduced buffer; op is "max", "min" or "sum"
Reduce = Callable[[str, list[torch.Tensor]], torch.Tensor]
# gather(this source's object) -> every source's object, in source order
Gather = Callable[[object], list]
_NO_CHANNELS = -(1 << 62)  # stands for "no data" where the smallest channel count is reduced


# --- what to merge ------------------------------------------------------------------------------------


def collect(obj, prefix: str = "") -> Entries:
    """``(name, observer)`` pairs of an observer, a Mapping or iterable of them, or an ``nn.Module``.

    Raises:
        TypeError: ``obj`` is none of these, or holds something that is not an observer.
        ValueError: two different observers under one name.
    """
    if isinstance(obj, ObserverBase):
        return [(prefix, obj)]
    if isinstance(obj, nn.Module):
        return [(name, m) for name, m in obj.named_modules(prefix=prefix) if isinstance(m, ObserverBase)]
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, torch.Tensor)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        raise TypeError(
            f"cannot merge {type(obj).__name__}; pass an observer, an iterable or Mapping of observers "
            "(e.g. a CalibrationResult) or an nn.Module that contains observers"
        )
    entries: Entries = []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(value, (ObserverBase, nn.Module, Mapping)):
            raise TypeError(f"{name!r} is a {type(value).__name__}, not an observer")
        entries += collect(value, name)
    ids, unique = {}, []
    for name, obs in entries:  # an observer reached twice (shared module) is merged once
        if id(obs) not in ids.values():
            if name in ids:
                raise ValueError(f"two different observers are named {name!r}; give each a name of its own")
            ids[name] = id(obs)
            unique.append((name, obs))
    return unique


def _descriptor(name: str, obs: ObserverBase) -> str:
    """What must agree between sources for one observer: its name, class and settings."""
    settings = {k: str(v) for k, v in obs.settings().items()}
    return json.dumps([name, type(obs).__name__, settings], sort_keys=True)


def _checksum(entries: Entries) -> int:
    return zlib.crc32(";".join(_descriptor(n, o) for n, o in entries).encode()) & 0x7FFFFFFF


def _first_difference(all_descriptors: list[list[str]]) -> str:
    """Where the sources' descriptor lists first differ, as one sentence."""
    first = all_descriptors[0]
    for r, other in enumerate(all_descriptors[1:], start=1):
        if set(other) != set(first):
            only_first = sorted(set(first) - set(other))[:1]
            only_other = sorted(set(other) - set(first))[:1]
            parts = [f"source 0 holds {json.loads(d)}" for d in only_first]
            parts += [f"source {r} holds {json.loads(d)}" for d in only_other]
            return "; ".join(parts) + " ([name, class, settings])"
    return "the observers differ"


# --- the merge: pack, reduce, unpack (pure functions of the observers) -------------------------------


def _check_layouts(entries: Entries, reduce: Reduce, gather: Gather, sources: list[Entries], device):
    """Check that every source holds the same observers; return each one's channel count (1 per tensor) and
    ``observer index -> E`` of the segmented ones (``mono_quant.core.segments``).

    Raises:
        ValueError: the sources hold different numbers, names, classes or settings of observers, a
            per-channel observer with different channel counts, or a segmented observer with different
            segment counts or unsegmented data somewhere (the same error from every rank).
    """
    bufs = []
    for src in sources:
        n, crc = len(src), _checksum(src)
        bufs.append(torch.tensor([n, -n, crc, -crc], dtype=torch.int64, device=device))
    n_max, n_min, crc_max, crc_min = reduce("max", bufs).tolist()
    n_min, crc_min = -n_min, -crc_min
    if n_max != n_min:
        raise ValueError(
            f"cannot merge observers: one rank or source holds {n_min} observers and another {n_max}; every "
            "rank must calibrate the same layers with the same observers"
        )
    if crc_max != crc_min:
        descriptors = gather([[_descriptor(n, o) for n, o in src] for src in sources])
        raise ValueError(
            "cannot merge observers: the ranks or sources hold observers of different names, types or "
            f"settings: {_first_difference(descriptors)}; create them under the same names with the same "
            "arguments"
        )
    channels = [1] * len(entries)
    per_channel = [i for i, (_, obs) in enumerate(entries) if obs.ch_axis is not None]
    segmentable = [i for i, (_, obs) in enumerate(entries) if obs.SEGMENTED]
    if not per_channel and not segmentable:
        return channels, {}
    return channels, _agree_channels(entries, reduce, sources, device, channels, per_channel, segmentable)


def _shaped(obs: ObserverBase) -> list[str]:
    """The "min" / "max" buffers an observer sizes itself (not the per-tensor or per-channel range)."""
    return [b for b, r in obs.MERGE_RULES.items() if r in ("min", "max") and b not in _RANGE]


def _shapes(entries: Entries, reduce: Reduce, sources: list[Entries], device) -> dict:
    """``(observer index, buffer) -> shape`` of every ``_shaped`` buffer, the same on every source that
    saw data (an empty one takes it from the others), by one MAX over ``[dims, -dims]``.

    Raises:
        ValueError: two sources hold a buffer of different shapes.
    """
    shaped = [(i, b) for i, (_, obs) in enumerate(entries) for b in _shaped(obs)]
    if not shaped:
        return {}
    bufs = []
    for src in sources:
        dims = []
        for i, b in shaped:
            buf = src[i][1]._buffers[b]
            dims += [*buf.shape, *((_NO_CHANNELS if buf.numel() == 0 else -d) for d in buf.shape)]
        bufs.append(torch.tensor(dims, dtype=torch.int64, device=device))
    reduced, out, offset = reduce("max", bufs).tolist(), {}, 0
    for i, b in shaped:
        k = entries[i][1]._buffers[b].dim()
        hi, lo = reduced[offset : offset + k], [-v for v in reduced[offset + k : offset + 2 * k]]
        offset += 2 * k
        if all(h > 0 for h in hi) and lo != hi:
            raise ValueError(
                f"cannot merge observer {entries[i][0]!r}: its {b} has shape {tuple(lo)} in one rank or "
                f"source and {tuple(hi)} in another; it must watch tensors of one shape"
            )
        out[i, b] = tuple(hi)
    return out


def _channel_count(obs: ObserverBase) -> int:
    if obs.num_segments is not None:  # (E, C)
        return obs.running_min.shape[-1]
    return obs.running_min.numel()


def _agree_channels(entries, reduce, sources, device, channels, per_channel, segmentable) -> dict[int, int]:
    """One MAX over the channel counts and the segment counts; fills ``channels``, returns the segments."""
    bufs = []
    for src in sources:
        sizes = torch.tensor([_channel_count(src[i][1]) for i in per_channel], dtype=torch.int64)
        low = torch.where(sizes > 0, -sizes, _NO_CHANNELS)  # -min of the non-empty ones after MAX
        seg = []
        for i in segmentable:
            obs = src[i][1]
            e = obs.num_segments or 0
            seg += [e, -e if e else _NO_CHANNELS, int(e == 0 and obs._observed())]
        bufs.append(torch.cat([sizes, low, torch.tensor(seg, dtype=torch.int64)]).to(device))
    reduced = reduce("max", bufs).tolist()
    segments = {}
    for j, i in enumerate(segmentable):
        e_max, e_min, plain = reduced[2 * len(per_channel) + 3 * j :][:3]
        if e_max > 0 and (-e_min != e_max or plain):
            what = (
                f"{-e_min} segments in one rank or source and {e_max} in another"
                if -e_min != e_max
                else "segments in one rank or source and data observed without segments in another"
            )
            raise ValueError(f"cannot merge observer {entries[i][0]!r}: it has {what}")
        if e_max > 0:
            segments[i] = e_max
    k = len(per_channel)
    for j, i in enumerate(per_channel):
        c_max, c_min = reduced[j], -reduced[k + j]
        if c_max > 0 and c_min != c_max:
            raise ValueError(
                f"cannot merge observer {entries[i][0]!r}: it has {c_min} channels in one rank or source "
                f"and {c_max} in another; per-channel observers must watch tensors of one shape"
            )
        channels[i] = c_max
    return segments


class _SegmentView:
    """Segment ``e`` of a segmented observer as the merge sees an observer: views of its buffers (writes
    land in the observer), with ``tokens_seen`` (and on segment 0 ``invalid_segments``) summed."""

    def __init__(self, obs: ObserverBase, e: int):
        self.ch_axis = obs.ch_axis
        self.num_segments = None
        self._buffers = {n: obs._buffers[n][e] for n in obs.SEGMENT_FIELDS}
        self._buffers["tokens_seen"] = obs.tokens_seen[e : e + 1]
        self.MERGE_RULES = {**obs.MERGE_RULES, "tokens_seen": "sum"}
        if e == 0:
            self._buffers["invalid_segments"] = obs.invalid_segments.reshape(1)
            self.MERGE_RULES["invalid_segments"] = "sum"

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_buffers"][name]
        except KeyError:
            raise AttributeError(name) from None

    def _merged(self) -> None:
        pass


def _expand_segments(targets: Entries, sources: list[Entries], channels: list[int], segments: dict):
    """Every segmented observer as ``E`` entries of one segment each (a blank one is segmented first: in
    place where it is a target, on a copy where it is only a source, which stays unchanged)."""
    targets_ids = {id(obs) for _, obs in targets}

    def expand(entries: Entries) -> Entries:
        out = []
        for i, (name, obs) in enumerate(entries):
            num = segments.get(i)
            if num is None:
                out.append((name, obs))
                continue
            if obs.num_segments is None:
                obs = obs if id(obs) in targets_ids else copy.deepcopy(obs)
                make_segmented(obs, num, channels[i] if obs.ch_axis is not None else None)
            out += [(f"{name}[{e}]", _SegmentView(obs, e)) for e in range(num)]
        return out

    new_channels = [c for i, c in enumerate(channels) for _ in range(segments.get(i, 1))]
    new_targets = expand(targets)
    new_sources = [new_targets if src is targets else expand(src) for src in sources]
    return new_targets, new_sources, new_channels


_RANGE = ("running_min", "running_max")


def _buffers(obs: ObserverBase, rule: str) -> list[str]:
    return [name for name, r in obs.MERGE_RULES.items() if r == rule]


def _shape(obs: ObserverBase, c: int) -> tuple[int, ...]:
    return (c,) if obs.ch_axis is not None else ()


def _padded(t: torch.Tensor, size: int, fill: float, device) -> torch.Tensor:
    """A float32 ``(size,)`` copy of ``t`` on ``device``; ``fill`` where ``t`` is empty (no data seen)."""
    if t.numel() == 0:
        return torch.full((size,), fill, dtype=torch.float32, device=device)
    return t.reshape(-1).to(device=device, dtype=torch.float32)


def _size(shapes: dict, i: int, b: str, c: int) -> int:
    return math.prod(shapes[i, b]) if (i, b) in shapes else c


def _pack_minmax(src: Entries, channels: list[int], shapes: dict, device) -> torch.Tensor:
    """float32: every "min" buffer, then every negated "max" buffer (reduced by MIN); a buffer of its own
    shape (``_shaped``: a per-block amax, an amax history) in full."""
    parts = []
    for sign, rule, fill in ((1, "min", float("inf")), (-1, "max", float("-inf"))):
        for i, ((_, obs), c) in enumerate(zip(src, channels, strict=True)):
            parts += [
                sign * _padded(obs._buffers[b], _size(shapes, i, b, c), fill, device)
                for b in _buffers(obs, rule)
            ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=device)


def _unpack_minmax(
    entries: Entries, channels: list[int], shapes: dict, reduced: torch.Tensor
) -> dict[tuple[int, str], torch.Tensor]:
    """``(observer index, buffer) -> merged value`` of the reduced MIN buffer."""
    out, offset = {}, 0
    for sign, rule in ((1, "min"), (-1, "max")):
        for i, ((_, obs), c) in enumerate(zip(entries, channels, strict=True)):
            for b in _buffers(obs, rule):
                n = _size(shapes, i, b, c)
                out[i, b] = (sign * reduced[offset : offset + n]).reshape(shapes.get((i, b), _shape(obs, c)))
                offset += n
    return out


def _histogram_ranges(entries: Entries, merged: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Observer index -> the merged range of each histogram (its grid is a function of it)."""
    return {
        i: (merged[i, "running_min"], merged[i, "running_max"])
        for i, (_, obs) in enumerate(entries)
        if _buffers(obs, "counts")
    }


def _pack_sums(src: Entries, ranges: dict, device) -> tuple[torch.Tensor, dict]:
    """int64: every "sum" buffer, then every histogram's counts moved onto the grid of its merged range
    (reduced by SUM); and that grid ``(exponent, origin)`` per histogram."""
    parts = [obs._buffers[b].to(device) for _, obs in src for b in _buffers(obs, "sum")]
    grids = {}
    for i, (mn, mx) in ranges.items():
        obs = src[i][1]
        e, o, moved = regrid_to_range(
            obs.counts.to(device), obs.exponent.to(device), obs.origin.to(device), mn, mx
        )
        parts.append(moved)
        grids[i] = (e, o)
    return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)), grids


def _pack_ema(src: Entries, channels: list[int], device) -> torch.Tensor:
    """float64: per "ema" buffer ``[w * v, w]`` with ``w = seen[BATCHES]`` where ``v`` is finite."""
    parts = []
    for (_, obs), c in zip(src, channels, strict=True):
        batches = obs.seen[Seen.BATCHES].to(device=device, dtype=torch.float64)
        for b in _buffers(obs, "ema"):
            v = _padded(obs._buffers[b], c, float("nan"), device).to(torch.float64)
            # w * v is exact in float64 (float32 values, weights below 2**29)
            w = torch.where(torch.isfinite(v), batches, 0.0)
            parts += [torch.where(w > 0, w * v, 0.0), w]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=device)


def _unpack_ema(
    entries: Entries, channels: list[int], reduced: torch.Tensor
) -> dict[tuple[int, str], torch.Tensor]:
    out, offset = {}, 0
    fills = {"running_min": float("inf"), "running_max": float("-inf")}
    for i, ((_, obs), c) in enumerate(zip(entries, channels, strict=True)):
        for b in _buffers(obs, "ema"):
            num, w = reduced[offset : offset + c], reduced[offset + c : offset + 2 * c]
            offset += 2 * c
            has = w > 0
            value = torch.where(has, num / torch.where(has, w, 1.0), fills.get(b, float("nan")))
            out[i, b] = value.to(torch.float32).reshape(_shape(obs, c))
    return out


def _set(obs: ObserverBase, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into buffer ``name`` in place, resizing an empty per-channel buffer first."""
    buf = obs._buffers[name]
    if buf.shape != value.shape:
        buf.resize_(value.shape)
    buf.copy_(value)


def merge(sources: list[Entries], targets: Entries, reduce: Reduce, gather: Gather, device) -> None:
    """Merge the observers of every source (lists in the same name order) into ``targets``.

    ``sources`` holds one list per rank's contribution: the local observers in ``sync_observers`` (then
    ``targets`` is the same list), one list per job in ``merge_observers``.
    """
    channels, segments = _check_layouts(targets, reduce, gather, sources, device)
    if not targets:
        return
    if segments:
        targets, sources, channels = _expand_segments(targets, sources, channels, segments)
    shapes = _shapes(targets, reduce, sources, device)
    minmax_bufs = [_pack_minmax(src, channels, shapes, device) for src in sources]
    merged = {}
    if minmax_bufs[0].numel() > 0:  # the same on every source: the layouts agree
        merged = _unpack_minmax(targets, channels, shapes, reduce("min", minmax_bufs))
    ranges = _histogram_ranges(targets, merged)
    packed = [_pack_sums(src, ranges, device) for src in sources]
    sums, grids = reduce("sum", [p[0] for p in packed]), packed[0][1]
    ema_bufs = [_pack_ema(src, channels, device) for src in sources]
    if ema_bufs[0].numel() > 0:
        merged.update(_unpack_ema(targets, channels, reduce("sum", ema_bufs)))

    # every buffer is reduced: now write (the sources' states were all read before this point)
    offset = 0
    for _, obs in targets:
        for b in _buffers(obs, "sum"):
            n = obs._buffers[b].numel()
            _set(obs, b, sums[offset : offset + n].reshape(obs._buffers[b].shape))
            offset += n
    for i, (e, o) in grids.items():
        obs = targets[i][1]
        n = obs.counts.shape[0]
        obs.counts.copy_(sums[offset : offset + n])
        obs.exponent.copy_(e)
        obs.origin.copy_(o)
        offset += n
    for (i, b), value in merged.items():
        _set(targets[i][1], b, value)
    for _, obs in targets:  # what derives from the merged buffers ("derived")
        obs._merged()
