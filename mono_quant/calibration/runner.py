"""Observers by name, and calibration of a model's layer inputs with forward hooks."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mono_quant.core.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)

__all__ = [
    "CalibrationResult",
    "ExperimentalWarning",
    "OBSERVERS",
    "create_observer",
    "run_calibration",
]


class ExperimentalWarning(UserWarning):
    """A feature whose behaviour may change without notice."""


# Names are matched lower-cased with "_" and "-" removed.
OBSERVERS: dict[str, type[ObserverBase]] = {
    "minmax": MinMaxObserver,
    "minmaxobserver": MinMaxObserver,
    "movingaverage": MovingAverageMinMaxObserver,
    "movingaverageminmax": MovingAverageMinMaxObserver,
    "movingaverageminmaxobserver": MovingAverageMinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "histogramobserver": HistogramObserver,
    "kl": HistogramObserver,
    "perchannelminmax": PerChannelMinMaxObserver,
    "perchannelminmaxobserver": PerChannelMinMaxObserver,
    "movingaverageperchannelminmax": MovingAveragePerChannelMinMaxObserver,
    "movingaverageperchannelminmaxobserver": MovingAveragePerChannelMinMaxObserver,
}


def _auto_select_observer(**kwargs) -> ObserverBase:
    """Experimental: pick the observer from the keywords given.

    ``averaging_constant`` -> ``MovingAverageMinMaxObserver``; ``bins`` or ``method`` ->
    ``HistogramObserver``; otherwise ``MinMaxObserver``. Warns with ``ExperimentalWarning``.
    """
    warnings.warn(
        "observer 'auto' is experimental: it picks the observer from the keywords given and may change",
        ExperimentalWarning,
        stacklevel=3,
    )
    if "averaging_constant" in kwargs:
        cls = MovingAverageMinMaxObserver
    elif "bins" in kwargs or "method" in kwargs:
        cls = HistogramObserver
    else:
        cls = MinMaxObserver
    return cls(**kwargs)


def create_observer(observer_type: str, **kwargs) -> ObserverBase:
    """Create an observer by name; keywords go to its constructor.

    Args:
        observer_type: a name from ``OBSERVERS`` or ``"auto"``, matched lower-cased with ``_`` and ``-``
            removed (``"MinMax"``, ``"moving_average"``, ``"per-channel-minmax"`` all work).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if not isinstance(observer_type, str):
        raise ValueError(f"observer_type must be a name (str), got {observer_type!r}")
    key = observer_type.lower().replace("_", "").replace("-", "")
    if key == "auto":
        return _auto_select_observer(**kwargs)
    if key not in OBSERVERS:
        valid = ", ".join(sorted([*OBSERVERS, "auto"]))
        raise ValueError(f"unknown observer {observer_type!r}; valid names: {valid}")
    return OBSERVERS[key](**kwargs)


@dataclass
class CalibrationResult(Mapping):
    """Module name -> observer of that module's input, in model order.

    ``result.qparams()`` gives ``{name: (scale, zero_point)}``; ``result.batches`` the batches run.
    """

    observers: dict[str, ObserverBase] = field(default_factory=dict)
    batches: int = 0

    def __getitem__(self, name: str) -> ObserverBase:
        return self.observers[name]

    def __iter__(self):
        return iter(self.observers)

    def __len__(self) -> int:
        return len(self.observers)

    def qparams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (scale, zero_point)}`` for every observer that saw finite data."""
        out = {}
        for name, obs in self.observers.items():
            if int(obs.seen[0]) > 0:
                out[name] = obs.calculate_qparams()
        return out


def call_model(model: nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def move_batch(batch, device):
    """``batch`` with every tensor in it (nested in dicts, tuples and lists) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def layer_input(args: tuple, kwargs: dict | None = None) -> torch.Tensor | None:
    """The first floating-point tensor among a module call's arguments: what its observer watches."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def run_calibration(
    model: nn.Module,
    data: Iterable,
    observer: str | type[ObserverBase] = "minmax",
    *,
    modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d),
    observer_kwargs: dict | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    sync: bool = False,
) -> CalibrationResult:
    """Run ``data`` through ``model`` and observe the input activation of every matching module.

    The model runs in eval mode under ``torch.no_grad()``; its training flag is restored afterwards, and
    the hooks are removed on every exit path (also when the model raises). Each observer is moved to the
    device of the activations it observes.

    Args:
        model: any ``nn.Module``.
        data: an iterable of batches: a tensor (``model(x)``), a tuple/list (``model(*batch)``) or a dict
            (``model(**batch)``).
        observer: a name for ``create_observer`` or an observer class.
        modules: module types whose inputs are observed.
        observer_kwargs: keywords for each observer (``bins``, ``dtype``, ``qscheme``, ...).
        max_batches: stop after this many batches.
        device: move each batch there first (the model is not moved).
        progress: show a tqdm progress bar; ``None``: when stderr is a terminal and ``data`` has a length
            above 10.
        sync: merge every observer across ranks at the end (``mono_quant.distributed.sync_observers``)
            when a torch.distributed process group is initialized.

    Returns:
        ``CalibrationResult``: module name -> observer.

    Raises:
        ValueError: no module of ``model`` matches ``modules``.
    """
    kwargs = dict(observer_kwargs or {})
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, modules) and name]
    if not targets and isinstance(model, modules):
        targets = [("", model)]
    if not targets:
        kinds = ", ".join(t.__name__ for t in modules)
        raise ValueError(f"the model has no module of type {kinds} to calibrate")

    def make() -> ObserverBase:
        if isinstance(observer, type) and issubclass(observer, ObserverBase):
            return observer(**kwargs)
        return create_observer(observer, **kwargs)

    result = CalibrationResult({name: make() for name, _ in targets})

    def hook_for(obs: ObserverBase):
        def hook(_module, args, kwargs_=None):
            x = layer_input(args, kwargs_)
            if x is not None:
                if x.device != obs.seen.device:  # follow the activation (also parameter-free or offloaded)
                    obs.to(x.device)
                obs(x)

        return hook

    total = len(data) if hasattr(data, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    if progress is None:
        progress = sys.stderr.isatty() and (total or 0) > 10
    iterator = iter(data)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=total, desc="calibrating", unit="batch")

    was_training = model.training
    handles = [
        m.register_forward_pre_hook(hook_for(obs), with_kwargs=True)
        for obs, (_, m) in zip(result.observers.values(), targets)
    ]
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(iterator):
                if max_batches is not None and i >= max_batches:
                    break
                call_model(model, move_batch(batch, device))
                result.batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if progress and hasattr(iterator, "close"):
            iterator.close()
    if sync:
        from mono_quant import distributed

        distributed.sync_observers(result)
    return result
