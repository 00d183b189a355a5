"""``ObserverGroup``: many observers updated from a list of tensors in one call; ``calibrate_weights``: every
weight of a model observed in one such call.

Why a group: a model has hundreds of layers, and one observer call per layer costs a few kernel launches
and tens of microseconds of host time each. A group sends all its per-tensor min/max and moving-average
observers through two launches on CUDA, whatever their number (``group_ops``: a table of the tensors'
and state buffers' addresses); every other observer, and every observer on the CPU, is called as usual.
The state afterwards is that of calling each observer on its tensor, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mono_quant.core.base import ObserverBase
from mono_quant.core.checks import check_input, check_mask
from mono_quant.distributed import sync_observers
from mono_quant.group_ops import minmax_update_many_
from mono_quant.ops import resolve_backend

__all__ = ["ObserverGroup", "calibrate_weights"]


def _batched(obs: ObserverBase) -> bool:
    """Whether ``obs``'s update is the plain per-tensor min/max or moving average (``ObserverBase``'s)."""
    plain = obs.ch_axis is None and obs.num_segments is None
    return plain and type(obs)._observe is ObserverBase._observe


class ObserverGroup:
    """A fixed list of observers, each updated from its own tensor by one call.

    Args:
        observers: a sequence of observers, or a mapping ``{name: observer}`` (then ``update`` also takes
            a mapping with the same names). Each observer once.

    Raises:
        TypeError: something that is not an observer. ValueError: an observer given twice, or none.
    """

    def __init__(self, observers: Sequence[ObserverBase] | Mapping[str, ObserverBase]):
        if isinstance(observers, Mapping):
            self.names: list[str] | None = list(observers)
            observers = list(observers.values())
        else:
            self.names = None
            observers = list(observers)
        if not observers:
            raise ValueError("an ObserverGroup needs at least one observer")
        for i, obs in enumerate(observers):
            if not isinstance(obs, ObserverBase):
                raise TypeError(
                    f"observer {self._label(i)} is a {type(obs).__name__}, not a mono_quant observer"
                )
        if len({id(o) for o in observers}) != len(observers):
            raise ValueError("an observer appears twice in the group; each is updated once a call")
        self.observers: list[ObserverBase] = observers

    def _label(self, i: int) -> str:
        return repr(self.names[i]) if self.names else str(i)

    def __len__(self) -> int:
        return len(self.observers)

    def __iter__(self) -> Iterator[ObserverBase]:
        return iter(self.observers)

    def items(self) -> list[tuple[str, ObserverBase]]:
        """``(name, observer)`` pairs (names ``"0"``, ``"1"``, ... for a sequence)."""
        names = self.names or [str(i) for i in range(len(self.observers))]
        return list(zip(names, self.observers, strict=True))

    def _tensors(self, tensors) -> list[torch.Tensor]:
        if isinstance(tensors, Mapping):
            if self.names is None or set(tensors) != set(self.names):
                raise ValueError(
                    "a mapping of tensors needs a group made from a mapping, with the same names"
                )
            tensors = [tensors[n] for n in self.names]
        else:
            tensors = list(tensors)
        if len(tensors) != len(self.observers):
            raise ValueError(f"got {len(tensors)} tensors for a group of {len(self.observers)} observers")
        for i, (x, obs) in enumerate(zip(tensors, self.observers, strict=True)):
            try:
                check_input(x)
            except TypeError as e:
                raise TypeError(f"tensor {self._label(i)}: {e}") from None
            if x.device != obs.seen.device:
                raise ValueError(
                    f"tensor {self._label(i)} is on {x.device} but its observer's buffers are on "
                    f"{obs.seen.device}; move the observer first"
                )
        return tensors

    def update(
        self,
        tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        """Observe ``tensors[i]`` with observer ``i``, for every ``i``: the state of ``obs(x)`` on each.

        Per-tensor min/max and moving-average observers whose backend resolves to the kernels are updated
        in two launches per device for all of them; the others are called one by one, in order.

        Args:
            tensors: one float tensor per observer (empty ones are skipped, as an observer skips them).
            masks: ``None``, or one token mask (or ``None``) per tensor, in the group's order: a tensor with
                a mask is observed as ``obs(x, mask=m)``, one observer at a time.

        Raises:
            ValueError: the wrong number (or names) of tensors, a tensor on another device than its
                observer. TypeError: a tensor an observer cannot take. Both before any state changes; an
                observer that refuses its tensor's shape (a per-channel observer given another channel count)
                raises as it would alone, after the observers before it were updated.
        """
        tensors = self._tensors(tensors)
        masks = [None] * len(tensors) if masks is None else list(masks)
        if len(masks) != len(tensors):
            raise ValueError(f"got {len(masks)} masks for a group of {len(self.observers)} observers")
        for i, (x, m) in enumerate(zip(tensors, masks, strict=True)):
            if m is not None:
                try:
                    check_mask(x, m)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"mask {self._label(i)}: {e}") from None
        fast: dict[torch.device, list[int]] = {}
        rest = []
        for i, (x, obs) in enumerate(zip(tensors, self.observers, strict=True)):
            plain = masks[i] is None and x.numel() and _batched(obs)
            if plain and resolve_backend(x, obs.backend) == "triton":
                fast.setdefault(x.device, []).append(i)
            else:
                rest.append(i)
        for idx in fast.values():
            minmax_update_many_(
                [tensors[i].detach() for i in idx],
                [self.observers[i].range_state() for i in idx],
                [self.observers[i].averaging_constant for i in idx],
                backend="triton",
            )
        for i in rest:
            if masks[i] is None:
                self.observers[i](tensors[i])
            else:
                self.observers[i](tensors[i], mask=masks[i])

    __call__ = update

    def sync(self, group=None) -> ObserverGroup:
        """Merge every observer across the ranks of ``group`` (``sync_observers``: the same fixed number of
        collectives whatever the group's size). Every rank calls it with a group of the same layout."""
        sync_observers(dict(self.items()), group)
        return self


def calibrate_weights(
    modules: Mapping[str, nn.Module] | nn.Module, make: Callable[[], ObserverBase]
) -> dict[str, ObserverBase]:
    """One observer per module's ``weight``, all fed their weights in one ``ObserverGroup`` call.

    Args:
        modules: ``{name: module}``, or a model (then every ``nn.Linear`` / ``nn.Conv*`` of it).
        make: returns a fresh observer (``lambda: mq.MinMaxObserver(qscheme="symmetric")``, or
            ``lambda: mq.PerChannelMinMaxObserver(ch_axis=0)``); it is moved to its weight's device.

    Returns:
        ``{name: observer}`` in the modules' order.

    Raises:
        ValueError: a module without a ``weight`` tensor.
    """
    if isinstance(modules, nn.Module):
        from mono_quant.calibration.engine import target_modules

        modules = target_modules(modules)
    weights = {}
    for name, m in modules.items():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"module {name!r} ({type(m).__name__}) has no weight tensor to calibrate")
        weights[name] = w.detach()
    observers = {name: make().to(w.device) for name, w in weights.items()}
    ObserverGroup(observers).update(weights)
    return observers
