"""``run_calibration``: one observer on the input of every matching layer of a model.

Layers that read the same input tensor (the q / k / v projections of an attention block, the gate / up
projections of a gated MLP) share one observer: the input is observed once and the layers get one set of
qparams, the single input scale that fused kernels need. Which layers share is found on the first batch, by
tensor identity in the hooks (a weak reference: no activation is kept), and checked on every later batch.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mono_quant.calibration.engine import (
    CALIBRATED_MODULES,
    channel_axis,
    layer_input,
    run_batches,
    target_modules,
)
from mono_quant.core.base import ObserverBase
from mono_quant.core.registry import create_observer
from mono_quant.distributed import sync_observers

__all__ = ["CalibrationResult", "run_calibration"]


@dataclass
class CalibrationResult(Mapping):
    """Module name -> observer of that module's input, in model order.

    ``result.qparams()`` gives ``{name: (scale, zero_point)}``; ``result.batches`` the batches run;
    ``result.groups()`` the layers that share an observer (and so their qparams) because they read the same
    input tensor.
    """

    observers: dict[str, ObserverBase] = field(default_factory=dict)
    batches: int = 0
    shared: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose observer it shares

    def groups(self) -> dict[str, list[str]]:
        """``{first layer: [the layers reading its input, itself first]}`` for every shared input."""
        out: dict[str, list[str]] = {}
        for member, leader in self.shared.items():
            out.setdefault(leader, [leader]).append(member)
        return out

    def __getitem__(self, name: str) -> ObserverBase:
        return self.observers[name]

    def __iter__(self):
        return iter(self.observers)

    def __len__(self) -> int:
        return len(self.observers)

    def qparams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (scale, zero_point)}`` for every observer that saw finite data."""
        return {name: obs.calculate_qparams() for name, obs in self.observers.items() if obs._has_finite()}


def _make(observer, kwargs: dict, module: nn.Module) -> ObserverBase:
    if isinstance(observer, type) and issubclass(observer, ObserverBase):
        obs = observer(**kwargs)
    else:
        obs = create_observer(observer, **kwargs)
    if obs.ch_axis is not None and "ch_axis" not in kwargs:  # per channel: the layer's channel axis
        obs = type(obs)(**{**obs.settings(), "ch_axis": channel_axis(module), "backend": obs.backend})
    return obs


class _SharedInputs:
    """Observes each layer's input, once per tensor: a layer whose input is the very tensor another layer
    observed in this batch joins that layer's observer (decided on the first batch, checked afterwards)."""

    def __init__(self, observers: dict[str, ObserverBase], share: bool):
        self.observers = observers
        self.share = share
        self.leader: dict[str, str] = {}  # member -> leader, fixed after the first batch
        self.batch: dict[int, tuple[weakref.ref, str]] = {}  # id(x) -> (x, the layer that observed it)
        self.first = True

    def observe(self, name: str, x: torch.Tensor) -> None:
        entry = self.batch.get(id(x)) if self.share else None
        same = entry[1] if entry is not None and entry[0]() is x else None
        if self.first and same is not None:
            self.leader[name] = same
            return
        if name in self.leader:
            if same != self.leader[name]:
                raise RuntimeError(
                    f"layers {self.leader[name]!r} and {name!r} read the same input tensor in the first "
                    "batch but not in this one, so they cannot share an observer; pass share_inputs=False"
                )
            return
        obs = self.observers[name]
        if x.device != obs.seen.device:  # follow the activation (also parameter-free or offloaded)
            obs.to(x.device)
        obs(x)
        if self.share:
            self.batch[id(x)] = (weakref.ref(x), name)

    def end_batch(self) -> None:
        self.batch.clear()
        self.first = False


def run_calibration(
    model: nn.Module,
    data: Iterable,
    observer: str | type[ObserverBase] = "minmax",
    *,
    modules: tuple[type[nn.Module], ...] = CALIBRATED_MODULES,
    observer_kwargs: dict | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = False,
    share_inputs: bool = True,
) -> CalibrationResult:
    """Run ``data`` through ``model`` and observe the input activation of every matching module.

    The model runs in eval mode under ``torch.no_grad()``; its training flag is restored afterwards, and
    the hooks are removed on every exit path (also when the model raises). Each observer is moved to the
    device of the activations it observes. A ``torch.compile``'d model is calibrated under its original
    module names.

    Args:
        model: any ``nn.Module``.
        data: an iterable of batches: a tensor (``model(x)``), a tuple/list (``model(*batch)``) or a dict
            (``model(**batch)``, or ``model(batch)`` when ``forward`` takes one argument the keys do not
            name); an infinite generator is fine with ``max_batches``.
        observer: a name for ``create_observer`` or an observer class. A per-channel observer without an
            explicit ``ch_axis`` watches each layer's channel axis (1 for conv inputs, -1 otherwise).
        modules: module types whose inputs are observed.
        observer_kwargs: keywords for each observer (``bins``, ``dtype``, ``qscheme``, ...).
        max_batches: stop after this many batches (``None``: all; else a positive int).
        device: move each batch there first (the model is not moved).
        progress: show a tqdm progress bar; ``None``: when stderr is a terminal and ``data`` has a length
            above 10.
        sync: merge every observer across ranks at the end (``mono_quant.distributed.sync_observers``)
            when a torch.distributed process group is initialized.
        share_inputs: layers that read the same input tensor share one observer (see the module
            docstring); ``False``: every layer observes its input itself.

    Returns:
        ``CalibrationResult``: module name -> observer.

    Raises:
        ValueError: no module of ``model`` matches ``modules``, or a bad ``max_batches``.
        RuntimeError: the model raised on a batch (the message names the batch), or layers that shared an
            input in the first batch read different ones later.
    """
    kwargs = dict(observer_kwargs or {})
    targets = target_modules(model, modules)
    result = CalibrationResult({name: _make(observer, kwargs, m) for name, m in targets.items()})
    inputs = _SharedInputs(result.observers, share_inputs)

    def hook_factory(name: str):
        def hook(_module, args, kwargs_=None):
            x = layer_input(args, kwargs_)
            if x is not None:
                inputs.observe(name, x)

        return hook

    if progress is None:
        total = len(data) if hasattr(data, "__len__") else 0
        progress = sys.stderr.isatty() and min(total, max_batches or total) > 10
    result.batches = run_batches(
        model,
        data,
        hook_factory,
        modules=modules,
        device=device,
        max_batches=max_batches,
        progress=progress,
        on_batch_end=inputs.end_batch,
    )
    for member, leader in inputs.leader.items():  # members hold their group's observer
        result.observers[member] = result.observers[leader]
    result.shared = dict(inputs.leader)
    if sync:
        sync_observers(result)
    return result
