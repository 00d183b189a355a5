"""Exact merge of observer state across ranks (torch.distributed) and across saved calibration runs.

``sync_observers`` leaves every rank holding the state that one process would hold after seeing the data of
all ranks; ``merge_observers`` / ``merge_state_dicts`` do the same offline, for observers calibrated in
separate jobs. Observers are matched by name (the keys of a Mapping, the module paths of an ``nn.Module``,
the positions of a list), never by the order they happen to be listed in; every source must hold the same
names, with observers of the same class and ``settings()`` under each.

How each buffer merges is declared by its observer class (``MERGE_RULES``, ``mono_quant.core.base``); this
module only carries the rules out. Per buffer:

- ``"min"`` / ``"max"`` / ``"sum"``: elementwise (``running_min``, ``running_max``, ``seen``). Exact: equal to
  one process that saw all the data.
- ``"history_max"``: elementwise MAX of a buffer of fixed shape (``AmaxHistoryObserver.amax_history``), and
  ``"derived"``: not reduced, recomputed by the observer from the merged buffers (``_merged``: the scale of
  the merged history). Called after every step, a sync is TransformerEngine's ``reduce_amax``: the ranks'
  latest amaxes are reduced with MAX (the older slots agree already) and every rank takes the same scale;
  ``seen`` is summed at every call, though, so it counts earlier steps again (``AmaxHistoryObserver(
  reduce_amax=True)`` reduces only the amax, in one small collective per step, without host reads).
- ``"grid"`` and ``"counts"`` (histograms): every source computes the canonical grid of the *merged* range
  (``mono_quant.grid.canonical_grid``: a function of the range only), moves its counts onto it exactly
  (``regrid``) and the counts are summed. Exact: the grid, the counts and so the qparams of every method are
  those of one process that saw all the data.
- ``"ema"`` (moving averages): no exact merge exists, as an EMA depends on the order of the batches. The
  merged value, per channel, is the mean of the sources' EMAs weighted by the batches each observed
  (``seen[Seen.BATCHES]``, which counts every non-empty batch, also one with no finite value), over the
  sources that saw a finite value there (if none did it stays ``+inf``/``-inf``), computed in float64 and
  rounded to float32 once::

      merged = sum_r(batches_r * ema_r) / sum_r(batches_r)

  It equals the single-process result exactly when every contributing source holds the same EMA (replicated
  inputs, as every rank of a tensor-parallel group sees for a column-parallel layer) or when a single source
  saw finite data; otherwise it is a convex combination: it lies between the smallest and largest of the
  sources' EMAs. ``seen`` is summed, so merging merged results again weights them by all the batches.

Collectives. All observers share a fixed number of ``all_reduce`` calls, whatever their number:

1. MAX over ``int64 (4,)``: the number of observers and a checksum of their names, classes and settings
   (each sent as ``v`` and ``-v``, so MAX also yields the minimum): a mismatch raises the same error on every
   rank instead of hanging (one ``all_gather_object`` then names the first difference);
2. MAX over the channel counts of the per-channel observers (only if there are any): a rank that saw no data
   has empty ``(0,)`` buffers and learns the size here;
3. MIN over ``float32``: every ``"min"`` buffer and every negated ``"max"`` buffer;
4. SUM over ``int64``: every ``"sum"`` buffer and every histogram's counts, regridded onto the merged grid;
5. SUM over ``float64``: the weighted moving averages and their weights (only if there are any).

With ``gloo`` the buffers are CPU tensors, with ``nccl`` tensors on ``torch.cuda.current_device()`` (call
``torch.cuda.set_device(local_rank)`` first, as usual), with any other backend on the observers' device.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mono_quant.core.base import ObserverBase
from mono_quant.grid import canonical_grid, regrid
from mono_quant.state import Seen

__all__ = ["merge_observers", "merge_state_dicts", "sync_observers"]

_Entries = list[tuple[str, ObserverBase]]
# reduce(op, one buffer per source) -> the reduced buffer; op is "max", "min" or "sum"
_Reduce = Callable[[str, list[torch.Tensor]], torch.Tensor]
# gather(this source's object) -> every source's object, in source order
_Gather = Callable[[object], list]
_NO_CHANNELS = -(1 << 62)  # stands for "no data" where the smallest channel count is reduced
_RANGE_RULES = ("min", "max", "ema")  # buffers shaped like the range: () or (C,)


# --- what to merge ------------------------------------------------------------------------------------


def _collect(obj, prefix: str = "") -> _Entries:
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
    entries: _Entries = []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(value, (ObserverBase, nn.Module, Mapping)):
            raise TypeError(f"{name!r} is a {type(value).__name__}, not an observer")
        entries += _collect(value, name)
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


def _checksum(entries: _Entries) -> int:
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


def _check_layouts(entries: _Entries, reduce: _Reduce, gather: _Gather, sources: list[_Entries], device):
    """Check that every source holds the same observers; return each one's channel count (1 per tensor).

    Raises:
        ValueError: the sources hold different numbers, names, classes or settings of observers, or a
            per-channel observer with different channel counts (the same error from every rank).
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


def _buffers(obs: ObserverBase, rule: str) -> list[str]:
    return [name for name, r in obs.MERGE_RULES.items() if r == rule]


def _shape(obs: ObserverBase, c: int) -> tuple[int, ...]:
    return (c,) if obs.ch_axis is not None else ()


def _padded(t: torch.Tensor, size: int, fill: float, device) -> torch.Tensor:
    """A float32 ``(size,)`` copy of ``t`` on ``device``; ``fill`` where ``t`` is empty (no data seen)."""
    if t.numel() == 0:
        return torch.full((size,), fill, dtype=torch.float32, device=device)
    return t.reshape(-1).to(device=device, dtype=torch.float32)


def _pack_minmax(src: _Entries, channels: list[int], device) -> torch.Tensor:
    """float32: every "min" buffer, then every negated "max" and "history_max" buffer (reduced by MIN)."""
    parts = []
    for sign, rule, fill in ((1, "min", float("inf")), (-1, "max", float("-inf"))):
        for (_, obs), c in zip(src, channels, strict=True):
            parts += [sign * _padded(obs._buffers[b], c, fill, device) for b in _buffers(obs, rule)]
    for _, obs in src:
        parts += [
            -obs._buffers[b].reshape(-1).to(device, torch.float32) for b in _buffers(obs, "history_max")
        ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=device)


def _unpack_minmax(
    entries: _Entries, channels: list[int], reduced: torch.Tensor
) -> dict[tuple[int, str], torch.Tensor]:
    """``(observer index, buffer) -> merged value`` of the reduced MIN buffer."""
    out, offset = {}, 0
    for sign, rule in ((1, "min"), (-1, "max")):
        for i, ((_, obs), c) in enumerate(zip(entries, channels, strict=True)):
            for b in _buffers(obs, rule):
                out[i, b] = (sign * reduced[offset : offset + c]).reshape(_shape(obs, c))
                offset += c
    for i, (_, obs) in enumerate(entries):
        for b in _buffers(obs, "history_max"):
            n = obs._buffers[b].numel()
            out[i, b] = (-reduced[offset : offset + n]).reshape(obs._buffers[b].shape)
            offset += n
    return out


def _merged_grids(entries: _Entries, merged: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Observer index -> the canonical grid ``(exponent, origin)`` of each histogram's merged range."""
    return {
        i: canonical_grid(merged[i, "running_min"], merged[i, "running_max"], obs.counts.shape[0])
        for i, (_, obs) in enumerate(entries)
        if _buffers(obs, "counts")
    }


def _pack_sums(src: _Entries, grids: dict, device) -> torch.Tensor:
    """int64: every "sum" buffer, then every histogram's counts moved onto its merged grid (SUM)."""
    parts = [obs._buffers[b].to(device) for _, obs in src for b in _buffers(obs, "sum")]
    for i, (e, o) in grids.items():
        obs = src[i][1]
        parts.append(regrid(obs.counts.to(device), obs.exponent.to(device), obs.origin.to(device), e, o))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


def _pack_ema(src: _Entries, channels: list[int], device) -> torch.Tensor:
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
    entries: _Entries, channels: list[int], reduced: torch.Tensor
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


def _merge(sources: list[_Entries], targets: _Entries, reduce: _Reduce, gather: _Gather, device) -> None:
    """Merge the observers of every source (lists in the same name order) into ``targets``.

    ``sources`` holds one list per rank's contribution: the local observers in ``sync_observers`` (then
    ``targets`` is the same list), one list per job in ``merge_observers``.
    """
    channels = _check_layouts(targets, reduce, gather, sources, device)
    if not targets:
        return
    minmax_bufs = [_pack_minmax(src, channels, device) for src in sources]
    merged = {}
    if minmax_bufs[0].numel() > 0:  # the same on every source: the layouts agree
        merged = _unpack_minmax(targets, channels, reduce("min", minmax_bufs))
    grids = _merged_grids(targets, merged)
    sums = reduce("sum", [_pack_sums(src, grids, device) for src in sources])
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

    Every rank must call it with observers under the same names (the keys of a Mapping may come in any
    order), of the same types and settings, as for any collective. Afterwards each rank holds the state of one
    process that saw all ranks' data (see the module docstring for the rules, the moving average included).
    A rank that saw no data takes part normally. A no-op when torch.distributed is unavailable or not
    initialized, the group has one rank, or this rank is not in ``group``.

    Args:
        observers: an observer, an iterable or Mapping of observers (a ``CalibrationResult``), or an
            ``nn.Module`` that contains observers (all of its observer submodules are synced).
        group: the process group (default: the world).

    Returns:
        ``observers``, now merged.

    Raises:
        TypeError: ``observers`` holds something that is not an observer.
        ValueError: the ranks hold different numbers, names, types or settings of observers, or a
            per-channel observer with different channel counts (raised on every rank alike).
    """
    entries = sorted(_collect(observers), key=lambda entry: entry[0])
    if not _active(group):
        return observers
    device = _comm_device(group, entries)

    def all_reduce(op: str, bufs: list[torch.Tensor]) -> torch.Tensor:
        (buf,) = bufs
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, _DIST_OPS[op]), group=group)
        return buf

    def all_gather(objs: list) -> list:
        (obj,) = objs
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    _merge([entries], entries, all_reduce, all_gather, device)
    return observers


# --- offline ----------------------------------------------------------------------------------------------


def _stack_reduce(op: str, bufs: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(bufs)
    if op == "max":
        return stacked.amax(0)
    if op == "min":
        return stacked.amin(0)
    return stacked.sum(0)


def _by_name(target: _Entries, source: _Entries, index: int) -> _Entries:
    """``source`` in the name order of ``target``.

    Raises:
        ValueError: the two hold different names.
    """
    named = dict(source)
    missing = [n for n, _ in target if n not in named]
    extra = sorted(set(named) - {n for n, _ in target})
    if missing or extra:
        parts = [
            f"source {index} lacks {missing}" if missing else "",
            f"source {index} adds {extra}" if extra else "",
        ]
        raise ValueError(
            f"cannot merge observers: the sources hold different names ({'; '.join(p for p in parts if p)}); "
            "pass strict=False to merge each name over the sources that hold it"
        )
    return [(n, named[n]) for n, _ in target]


def merge_observers(sources: Sequence, *, strict: bool = True):
    """One observer (or collection) holding the merged state of several, e.g. calibrated in separate jobs.

    The same rules as ``sync_observers`` (exact for min/max, per-channel and histogram observers; the
    batch-weighted mean for moving averages); merging the ranks' states offline gives what a sync gives.
    Observers are matched by name, never by position in a Mapping.

    Args:
        sources: one or more of the same thing: observers, Mappings of observers (``CalibrationResult``) or
            ``nn.Module``s containing observers.
        strict: every source must hold the same names (default). ``False``: the result holds every name
            of any source, each merged over the sources that hold it (a layer, or an expert, that some jobs
            never saw); it is built on ``sources[0]`` and must be a Mapping then.

    Returns:
        A deep copy of ``sources[0]`` (with ``strict=False``: a dict) holding the merged state; the sources
        are left unchanged.

    Raises:
        ValueError: ``sources`` is empty, or the sources hold different observers (names, type, settings,
            channel counts).
        TypeError: a source holds something that is not an observer.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("merge_observers needs at least one source, got none")
    if not strict:
        return _merge_union(sources)
    merged = copy.deepcopy(sources[0])
    targets = _collect(merged)
    entries = [_by_name(targets, _collect(src), i) for i, src in enumerate(sources)]
    device = targets[0][1].running_min.device if targets else torch.device("cpu")
    _merge(entries, targets, _stack_reduce, lambda objs: objs, device)
    return merged


def _merge_union(sources: list) -> dict:
    collected = [_collect(src) for src in sources]
    names = list(dict.fromkeys(n for entries in collected for n, _ in entries))
    out = {}
    for name in names:
        holders = [dict(entries)[name] for entries in collected if name in dict(entries)]
        out[name] = merge_observers(holders)
    return out


def _blank(template):
    """A deep copy of ``template`` with every observer reset, ready to load any channel count."""
    blank = copy.deepcopy(template)
    for _, obs in _collect(blank):
        obs.reset()
        if obs.ch_axis is not None:
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
        ValueError: no state dicts, or they do not match the template (names, classes, settings, shapes).
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
