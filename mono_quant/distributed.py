"""Exact merge of observer state across ranks (torch.distributed) and across saved calibration runs.

``sync_observers`` leaves every rank holding the state that one process would hold after seeing the data of
all ranks; ``merge_observers`` / ``merge_state_dicts`` do the same offline, for observers calibrated in
separate jobs. Both run one algorithm (``_merge``): the observers of each source are packed into a few flat
buffers, the buffers are reduced across sources (by ``all_reduce``, or by ``amin``/``amax``/``sum`` over a
stack of them), and the reduced buffers are unpacked into the observers.

Merge rules, per buffer (``seen`` is int64 ``(3,)``: finite values, non-finite values, batches):

- min/max observers (per tensor and per channel): ``running_min`` -> MIN, ``running_max`` -> MAX, ``seen`` ->
  SUM. Exact: equal to one process that saw all the data.
- histogram observers: the range as above; then every source computes the canonical grid of the *global*
  range (``grid.canonical_grid``: a function of the range only), moves its counts onto it exactly
  (``regrid``) and the counts are summed. Exact: the grid, the counts and so the qparams of every method are
  those of one process that saw all the data (see ``mono_quant.grid``).
- moving-average observers: no exact merge exists, as an EMA depends on the order of the batches. The merged
  value, per channel, is the mean of the sources' EMAs weighted by the batches each observed (``seen[2]``,
  which counts every non-empty batch, also one with no finite value), over the sources that saw a finite
  value there (the others are left out; if none did it stays ``+inf``/``-inf``), computed in float64 and
  rounded to float32 once::

      merged = sum_r(seen_r[2] * ema_r) / sum_r(seen_r[2])

  It equals the single-process result exactly when every contributing source holds the same EMA (replicated
  inputs, as every rank of a tensor-parallel group sees for a column-parallel layer) or when a single source
  saw finite data; otherwise it is a convex combination: it lies between the smallest and largest of the
  sources' EMAs, and estimates the same quantity when the sources see data from one distribution. ``seen``
  is summed, so merging merged results again weights them by all the batches behind them.

Collectives. All observers share a fixed number of ``all_reduce`` calls, whatever their number:

1. MAX over ``int64 (4,)``: the number of observers and a checksum of their types and settings (each sent as
   ``v`` and ``-v``, so MAX also yields the minimum: a mismatch raises the same error on every rank instead
   of hanging);
2. MAX over the channel counts of the per-channel observers (only if there are any): a rank that saw no data
   has empty ``(0,)`` buffers and learns the size here;
3. MIN over ``float32``: every min and every negated max (only if there are min/max or histogram
   observers);
4. SUM over ``int64``: every ``seen`` and every histogram's counts, regridded onto the global grid;
5. SUM over ``float64``: the weighted EMAs and their weights (only if there are moving-average observers).

With ``gloo`` the buffers are CPU tensors, with ``nccl`` tensors on ``torch.cuda.current_device()`` (call
``torch.cuda.set_device(local_rank)`` first, as usual), with any other backend on the observers' device.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mono_quant.core.observers import HistogramObserver, ObserverBase
from mono_quant.grid import canonical_grid, regrid

__all__ = ["merge_observers", "merge_state_dicts", "sync_observers"]

_Entries = list[tuple[str, ObserverBase]]
# reduce(op, one buffer per source) -> the reduced buffer; op is "max", "min" or "sum"
_Reduce = Callable[[str, list[torch.Tensor]], torch.Tensor]
_NO_CHANNELS = -(1 << 62)  # stands for "no data" where the smallest channel count is reduced


# --- what to merge ------------------------------------------------------------------------------------


def _collect(obj, prefix: str = "") -> _Entries:
    """``(name, observer)`` pairs of an observer, a Mapping or iterable of them, or an ``nn.Module``.

    Raises:
        TypeError: ``obj`` is none of these, or holds something that is not an observer.
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
    entries: _Entries = []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(value, (ObserverBase, nn.Module, Mapping)):
            raise TypeError(f"{name!r} is a {type(value).__name__}, not an observer")
        entries += _collect(value, name)
    seen, unique = set(), []
    for name, obs in entries:  # an observer reached twice (shared module) is merged once
        if id(obs) not in seen:
            seen.add(id(obs))
            unique.append((name, obs))
    return unique


def _is_ema(obs: ObserverBase) -> bool:
    return obs.averaging_constant is not None


def _per_channel(obs: ObserverBase) -> bool:
    return obs.ch_axis is not None


def _descriptor(entries: _Entries) -> int:
    """Checksum of what must agree between sources: each observer's class and merge-relevant settings."""
    parts = []
    for _, obs in entries:
        bins = obs.counts.shape[0] if isinstance(obs, HistogramObserver) else 0
        parts.append(f"{type(obs).__name__}:{obs.ch_axis}:{_is_ema(obs)}:{bins}")
    return zlib.crc32(";".join(parts).encode()) & 0x7FFFFFFF


# --- the merge: pack, reduce, unpack (pure functions of the observers) -------------------------------


def _check_layouts(entries: _Entries, reduce: _Reduce, sources: list[_Entries], device) -> list[int]:
    """Check that every source holds the same observers; return each one's channel count (1 per tensor).

    Raises:
        ValueError: the sources hold different numbers, types or settings of observers, or a per-channel
            observer with different channel counts.
    """
    bufs = []
    for src in sources:
        n, crc = len(src), _descriptor(src)
        bufs.append(torch.tensor([n, -n, crc, -crc], dtype=torch.int64, device=device))
    n_max, n_min, crc_max, crc_min = reduce("max", bufs).tolist()
    n_min, crc_min = -n_min, -crc_min
    if n_max != n_min:
        raise ValueError(
            f"cannot merge observers: one rank or source holds {n_min} observers and another {n_max}; every "
            "rank must calibrate the same layers with the same observers"
        )
    if crc_max != crc_min:
        raise ValueError(
            "cannot merge observers: the ranks or sources hold observers of different types or settings "
            "(class, ch_axis, averaging, bins) in the same places; create them with the same arguments"
        )
    channels = [1] * len(entries)
    per_channel = [i for i, (_, obs) in enumerate(entries) if _per_channel(obs)]
    if not per_channel:
        return channels
    bufs = []
    for src in sources:
        sizes = torch.tensor([src[i][1].running_min.numel() for i in per_channel], dtype=torch.int64)
        low = torch.where(sizes > 0, -sizes, _NO_CHANNELS)  # -min of the non-empty ones after MAX
        bufs.append(torch.cat([sizes, low]).to(device))
    reduced = reduce("max", bufs).tolist()
    k = len(per_channel)
    for j, i in enumerate(per_channel):
        c_max, c_min = reduced[j], -reduced[k + j]
        if c_max > 0 and c_min != c_max:
            raise ValueError(
                f"cannot merge observer {entries[i][0]!r}: it has {c_min} channels in one rank or source "
                f"and {c_max} in another; per-channel observers must watch tensors of one shape"
            )
        channels[i] = c_max
    return channels


def _padded(t: torch.Tensor, size: int, fill: float, device) -> torch.Tensor:
    """A float32 ``(size,)`` copy of ``t`` on ``device``; ``fill`` where ``t`` is empty (no data seen)."""
    if t.numel() == 0:
        return torch.full((size,), fill, dtype=torch.float32, device=device)
    return t.reshape(-1).to(device=device, dtype=torch.float32)


def _pack_range(src: _Entries, channels: list[int], device) -> torch.Tensor:
    """float32: the mins of the min/max and histogram observers, then their negated maxes (reduced by MIN)."""
    mins, neg_maxs = [], []
    for (_, obs), c in zip(src, channels, strict=True):
        if not _is_ema(obs):
            mins.append(_padded(obs.running_min, c, float("inf"), device))
            neg_maxs.append(-_padded(obs.running_max, c, float("-inf"), device))
    return torch.cat([*mins, *neg_maxs]) if mins else torch.empty(0, dtype=torch.float32, device=device)


def _split_range(entries: _Entries, channels: list[int], reduced: torch.Tensor) -> dict[int, tuple]:
    """Observer index -> ``(min, max)`` of the reduced range buffer, shaped like the observer's buffers."""
    out, offset = {}, 0
    ranged = [i for i, (_, obs) in enumerate(entries) if not _is_ema(obs)]
    total = sum(channels[i] for i in ranged)
    for i in ranged:
        c, obs = channels[i], entries[i][1]
        shape = (c,) if _per_channel(obs) else ()
        mn = reduced[offset : offset + c].reshape(shape)
        mx = -reduced[total + offset : total + offset + c].reshape(shape)
        out[i] = (mn, mx)
        offset += c
    return out


def _global_grids(entries: _Entries, ranges: dict[int, tuple]) -> dict[int, tuple]:
    """Observer index -> the canonical grid ``(exponent, origin)`` of each histogram's global range."""
    return {
        i: canonical_grid(*ranges[i], obs.counts.shape[0])
        for i, (_, obs) in enumerate(entries)
        if isinstance(obs, HistogramObserver)
    }


def _pack_sums(src: _Entries, grids: dict[int, tuple], device) -> torch.Tensor:
    """int64: every ``seen``, then every histogram's counts moved onto its global grid (reduced by SUM)."""
    parts = [obs.seen.to(device) for _, obs in src]
    for i, (e, o) in grids.items():
        obs = src[i][1]
        parts.append(regrid(obs.counts.to(device), obs.exponent.to(device), obs.origin.to(device), e, o))
    return torch.cat(parts)


def _pack_ema(src: _Entries, channels: list[int], device) -> torch.Tensor:
    """float64: per moving-average observer ``[w * min, w * max, w]`` with ``w = seen[2]`` where finite."""
    parts = []
    for (_, obs), c in zip(src, channels, strict=True):
        if not _is_ema(obs):
            continue
        mn = _padded(obs.running_min, c, float("inf"), device).to(torch.float64)
        mx = _padded(obs.running_max, c, float("-inf"), device).to(torch.float64)
        finite = torch.isfinite(mn) & torch.isfinite(mx)
        # w * v is exact in float64 (float32 values, weights below 2**29)
        w = torch.where(finite, obs.seen[2].to(device=device, dtype=torch.float64), 0.0)
        parts += [torch.where(finite, w * mn, 0.0), torch.where(finite, w * mx, 0.0), w]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=device)


def _store_ema(entries: _Entries, channels: list[int], reduced: torch.Tensor) -> None:
    offset = 0
    for (_, obs), c in zip(entries, channels, strict=True):
        if not _is_ema(obs):
            continue
        num_min, num_max, w = reduced[offset : offset + 3 * c].reshape(3, c)
        offset += 3 * c
        has = w > 0
        safe_w = torch.where(has, w, 1.0)
        mn = torch.where(has, num_min / safe_w, float("inf")).to(torch.float32)
        mx = torch.where(has, num_max / safe_w, float("-inf")).to(torch.float32)
        shape = (c,) if _per_channel(obs) else ()
        _set(obs, "running_min", mn.reshape(shape))
        _set(obs, "running_max", mx.reshape(shape))


def _set(obs: ObserverBase, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into buffer ``name`` in place, resizing an empty per-channel buffer first."""
    buf = getattr(obs, name)
    if buf.shape != value.shape:
        buf.resize_(value.shape)
    buf.copy_(value)


def _merge(sources: list[_Entries], targets: _Entries, reduce: _Reduce, device) -> None:
    """Merge the observers of every source (lists in one order) and write the result into ``targets``.

    ``sources`` holds one list per rank's contribution: the local observers in ``sync_observers`` (then
    ``targets`` is the same list), one list per job in ``merge_observers``.
    """
    channels = _check_layouts(targets, reduce, sources, device)
    if not targets:
        return
    ranges = {}
    range_bufs = [_pack_range(src, channels, device) for src in sources]
    if range_bufs[0].numel() > 0:  # the same on every source: the layouts agree
        ranges = _split_range(targets, channels, reduce("min", range_bufs))
    grids = _global_grids(targets, ranges)
    sums = reduce("sum", [_pack_sums(src, grids, device) for src in sources])
    ema_bufs = [_pack_ema(src, channels, device) for src in sources]
    ema = reduce("sum", ema_bufs) if ema_bufs[0].numel() > 0 else None

    # every buffer is reduced: now write (the sources' states were all read before this point)
    for i, (_, obs) in enumerate(targets):
        obs.seen.copy_(sums[3 * i : 3 * i + 3])
        if i in ranges:
            _set(obs, "running_min", ranges[i][0])
            _set(obs, "running_max", ranges[i][1])
    offset = 3 * len(targets)
    for i, (e, o) in grids.items():
        obs = targets[i][1]
        b = obs.counts.shape[0]
        obs.counts.copy_(sums[offset : offset + b])
        obs.exponent.copy_(e)
        obs.origin.copy_(o)
        offset += b
    if ema is not None:
        _store_ema(targets, channels, ema)


# --- across ranks ---------------------------------------------------------------------------------------

_DIST_OPS = {"max": "MAX", "min": "MIN", "sum": "SUM"}


def _active(group) -> bool:
    """Whether a process group with more than one rank exists and this rank belongs to it."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1 and dist.get_rank(group) >= 0


def _comm_device(group, entries: _Entries) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" or not entries:
        return torch.device("cpu")
    return entries[0][1].running_min.device


def sync_observers(observers, group=None):
    """Merge the state of every observer across the ranks of ``group``, in place, exactly where possible.

    Every rank must call it with the same observers (same order, types and settings), as for any
    collective. Afterwards each rank holds the state of one process that saw all ranks' data (see the module
    docstring for the rules, the moving average included). A rank that saw no data takes part normally.
    A no-op when torch.distributed is unavailable or not initialized, the group has one rank, or this rank
    is not in ``group``.

    Args:
        observers: an observer, an iterable or Mapping of observers (a ``CalibrationResult``), or an
            ``nn.Module`` that contains observers (all of its observer submodules are synced).
        group: the process group (default: the world).

    Returns:
        ``observers``, now merged.

    Raises:
        TypeError: ``observers`` holds something that is not an observer.
        ValueError: the ranks hold different numbers, types or settings of observers, or a per-channel
            observer with different channel counts (raised on every rank alike).
    """
    entries = _collect(observers)
    if not _active(group):
        return observers
    device = _comm_device(group, entries)

    def all_reduce(op: str, bufs: list[torch.Tensor]) -> torch.Tensor:
        (buf,) = bufs
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, _DIST_OPS[op]), group=group)
        return buf

    _merge([entries], entries, all_reduce, device)
    return observers


# --- offline ----------------------------------------------------------------------------------------------


def _stack_reduce(op: str, bufs: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(bufs)
    if op == "max":
        return stacked.amax(0)
    if op == "min":
        return stacked.amin(0)
    return stacked.sum(0)


def merge_observers(sources: Sequence):
    """One observer (or collection) holding the merged state of several, e.g. calibrated in separate jobs.

    The same rules as ``sync_observers`` (exact for min/max, per-channel and histogram observers; the
    batch-weighted mean for moving averages); merging the ranks' states offline gives what a sync gives.

    Args:
        sources: one or more of the same thing: observers, Mappings of observers (``CalibrationResult``) or
            ``nn.Module``s containing observers, with the same observers in the same order.

    Returns:
        A deep copy of ``sources[0]`` holding the merged state; the sources are left unchanged.

    Raises:
        ValueError: ``sources`` is empty, or the sources hold different observers (number, type, settings,
            channel counts).
        TypeError: a source holds something that is not an observer.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("merge_observers needs at least one source, got none")
    merged = copy.deepcopy(sources[0])
    targets = _collect(merged)
    entries = [_collect(src) for src in sources]
    device = targets[0][1].running_min.device if targets else torch.device("cpu")
    _merge(entries, targets, _stack_reduce, device)
    return merged


def _blank(template):
    """A deep copy of ``template`` with per-channel buffers emptied, ready to load any channel count."""
    blank = copy.deepcopy(template)
    for _, obs in _collect(blank):
        obs.reset()
        if _per_channel(obs):
            obs.running_min.resize_(0)
            obs.running_max.resize_(0)
    return blank


def merge_state_dicts(template, state_dicts: Sequence):
    """Merge observers saved with ``state_dict()`` by several calibration jobs (see ``merge_observers``).

    Args:
        template: what was saved, configured as in the jobs (observer classes and arguments): an observer,
            an ``nn.Module`` with observers, or a Mapping name -> observer (a ``CalibrationResult``).
        state_dicts: one per job: ``template.state_dict()`` for an observer or module; for a Mapping, a
            Mapping name -> that observer's ``state_dict()``.

    Returns:
        A new copy of ``template`` holding the merged state.

    Raises:
        ValueError: no state dicts, or they do not match the template.
    """
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise ValueError("merge_state_dicts needs at least one state_dict, got none")
    sources = []
    for sd in state_dicts:
        src = _blank(template)
        if isinstance(src, nn.Module):
            src.load_state_dict(sd)
        elif isinstance(src, Mapping):
            missing = set(src) ^ set(sd)
            if missing:
                raise ValueError(f"state dict and template disagree on the observers {sorted(missing)}")
            for name, obs in src.items():
                obs.load_state_dict(sd[name])
        else:
            raise TypeError(
                f"cannot load state into {type(template).__name__}; pass an observer, an nn.Module or a "
                "Mapping name -> observer as the template"
            )
        sources.append(src)
    return merge_observers(sources)
