"""Exact merge of observer state across ranks (torch.distributed) and across saved calibration runs.

``sync_observers`` leaves every rank holding the state that one process would hold after seeing the data of
all ranks; ``merge_observers`` / ``merge_state_dicts`` do the same offline, for observers calibrated in
separate jobs. Observers are matched by name (the keys of a Mapping, the module paths of an ``nn.Module``,
the positions of a list), never by the order they happen to be listed in; every source must hold the same
names, with observers of the same class and ``settings()`` under each.

How each buffer merges is declared by its observer class (``MERGE_RULES``, ``mono_quant.core.base``); this
module only carries the rules out. Per buffer:

- ``"min"`` / ``"max"`` / ``"sum"``: elementwise (``running_min``, ``running_max``, ``seen``; a buffer of its
  own shape, such as ``PerBlockObserver.block_amax`` or ``AmaxHistoryObserver.amax_history``, whose shape the
  sources agree on first). Exact: equal to one process that saw all the data.
- ``"derived"``: not reduced, recomputed by the observer from the merged buffers (``_merged``: the scale of
  the merged history). Called after every step, a sync is TransformerEngine's ``reduce_amax``: the ranks'
  latest amaxes are reduced with MAX (the older slots agree already) and every rank takes the same scale;
  ``seen`` is summed at every call, though, so it counts earlier steps again (``AmaxHistoryObserver(
  reduce_amax=True)`` reduces only the amax, in one small collective per step, without host reads).
- ``"grid"`` and ``"counts"`` (histograms): every source moves its counts exactly onto the canonical grid of
  the *merged* range (``mono_quant.grid.regrid_to_range``: the grid is a function of the range only) and the
  counts are summed. Exact: the grid, the counts and so the qparams of every method are
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
2. MAX over the channel counts of the per-channel observers and the segment counts of the observers that
   can be segmented (``mono_quant.core.segments``; only if there are any): a rank that saw no data has
   empty ``(0,)`` buffers, or no segments, and learns the sizes here. A segmented observer then merges
   segment by segment, each as a plain observer (``tokens_seen`` summed): an expert empty on some ranks
   merges exactly, and no rank waits on another;
3. MAX over the shapes of the buffers of their own shape (only if there are any: per-block amaxes, amax
   histories), the same way;
4. MIN over ``float32``: every ``"min"`` buffer and every negated ``"max"`` buffer;
5. SUM over ``int64``: every ``"sum"`` buffer and every histogram's counts, regridded onto the merged grid;
6. SUM over ``float64``: the weighted moving averages and their weights (only if there are any).

With ``gloo`` the buffers are CPU tensors, with ``nccl`` tensors on ``torch.cuda.current_device()`` (call
``torch.cuda.set_device(local_rank)`` first, as usual), with any other backend on the observers' device.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mono_quant.merge import Entries, collect, merge

__all__ = ["merge_observers", "merge_state_dicts", "sync_observers"]


# --- across ranks ---------------------------------------------------------------------------------------

_DIST_OPS = {"max": "MAX", "min": "MIN", "sum": "SUM"}


def _active(group) -> bool:
    """Whether a process group with more than one rank exists and this rank belongs to it."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1 and dist.get_rank(group) >= 0


def _comm_device(group, entries: Entries) -> torch.device:
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
        ValueError: the ranks hold different numbers, names, types or settings of observers, a
            per-channel observer with different channel counts, or a segmented observer with different
            segment counts or unsegmented data on some rank (raised on every rank alike).
    """
    entries = sorted(collect(observers), key=lambda entry: entry[0])
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

    merge([entries], entries, all_reduce, all_gather, device)
    return observers


# --- offline ----------------------------------------------------------------------------------------------


def _stack_reduce(op: str, bufs: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(bufs)
    if op == "max":
        return stacked.amax(0)
    if op == "min":
        return stacked.amin(0)
    return stacked.sum(0)


def _by_name(target: Entries, source: Entries, index: int) -> Entries:
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
    targets = collect(merged)
    entries = [_by_name(targets, collect(src), i) for i, src in enumerate(sources)]
    device = targets[0][1].running_min.device if targets else torch.device("cpu")
    merge(entries, targets, _stack_reduce, lambda objs: objs, device)
    return merged


def _merge_union(sources: list) -> dict:
    collected = [collect(src) for src in sources]
    names = list(dict.fromkeys(n for entries in collected for n, _ in entries))
    out = {}
    for name in names:
        holders = [dict(entries)[name] for entries in collected if name in dict(entries)]
        out[name] = merge_observers(holders)
    return out


def _blank(template):
    """A deep copy of ``template`` with every observer reset, ready to load any channel count."""
    blank = copy.deepcopy(template)
    for _, obs in collect(blank):
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
