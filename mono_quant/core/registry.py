"""The one registry of observer names: the factory, the CLI, ``mono-quant bench`` and ``benchmarks/`` use it.

A name stands for a class and preset keywords (``"kl"`` is ``HistogramObserver(method="kl")``). Names are
matched lower-cased with ``"_"`` and ``"-"`` removed; every class is also found by its own name, with or
without ``"Observer"``, and ``ALIASES`` adds a few more.
"""

from __future__ import annotations

import warnings

from mono_quant.core.block_observer import PerBlockObserver
from mono_quant.core.channel_stats import ChannelStatsObserver
from mono_quant.core.observers import (
    AmaxHistoryObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)

__all__ = ["ALIASES", "OBSERVERS", "ExperimentalWarning", "create_observer", "name_of", "observer_name"]

# name -> (class, preset keywords)
OBSERVERS: dict[str, tuple[type[ObserverBase], dict]] = {
    "minmax": (MinMaxObserver, {}),
    "moving_average": (MovingAverageMinMaxObserver, {}),
    "histogram": (HistogramObserver, {}),
    "kl": (HistogramObserver, {"method": "kl"}),
    "mse": (HistogramObserver, {"method": "mse"}),
    "percentile": (HistogramObserver, {"method": "percentile"}),
    "per_channel": (PerChannelMinMaxObserver, {}),
    "moving_average_per_channel": (MovingAveragePerChannelMinMaxObserver, {}),
    "amax_history": (AmaxHistoryObserver, {}),
    "per_block": (PerBlockObserver, {}),
    "channel_stats": (ChannelStatsObserver, {}),
}
ALIASES = {"ema": "moving_average", "per_channel_minmax": "per_channel"}


class ExperimentalWarning(UserWarning):
    """A feature whose behaviour may change without notice."""


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _lookup() -> dict[str, str]:
    table = {_key(alias): name for alias, name in ALIASES.items()}
    for name, (cls, preset) in OBSERVERS.items():
        if not preset:  # a class's own name means the class without a preset
            table.setdefault(_key(cls.__name__), name)
            table.setdefault(_key(cls.__name__.removesuffix("Observer")), name)
    table.update({_key(name): name for name in OBSERVERS})
    return table


def observer_name(name: str) -> str:
    """The registry name (a key of ``OBSERVERS``) that ``name`` stands for.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if not isinstance(name, str):
        raise ValueError(f"an observer name must be a str, got {name!r}")
    found = _lookup().get(_key(name))
    if found is None:
        valid = ", ".join([*OBSERVERS, *ALIASES])
        raise ValueError(
            f"unknown observer {name!r}; valid names: {valid} (or a class name; create_observer also takes "
            "'auto')"
        )
    return found


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
        observer_type: a name of ``OBSERVERS`` or ``ALIASES``, a class name, or ``"auto"``; matched
            lower-cased with ``_`` and ``-`` removed (``"MinMax"``, ``"moving_average"``, ``"per-channel"``
            and ``"PerChannelMinMaxObserver"`` all work). ``"kl"``, ``"mse"`` and ``"percentile"`` are the
            histogram observer with that ``method``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or a keyword that contradicts the
            name's preset (``create_observer("kl", method="mse")``).
    """
    if isinstance(observer_type, str) and _key(observer_type) == "auto":
        return _auto_select_observer(**kwargs)
    name = observer_name(observer_type)
    cls, preset = OBSERVERS[name]
    for key, value in preset.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(
                f"observer {name!r} means {key}={value!r}, got {key}={kwargs[key]!r}; "
                f"use 'histogram' with {key}={kwargs[key]!r}"
            )
    return cls(**{**preset, **kwargs})


def name_of(obs: ObserverBase) -> str:
    """The registry name that describes ``obs``: the one whose class and preset keywords it matches, a name
    with a preset first (a ``HistogramObserver(method="mse")`` is ``"mse"``, not ``"histogram"``).

    Raises:
        ValueError: no registry name describes it (a class of the user's own).
    """
    settings = obs.settings() if hasattr(obs, "settings") else {}
    matches = [
        name
        for name, (cls, preset) in OBSERVERS.items()
        if type(obs) is cls and all(settings.get(k) == v for k, v in preset.items())
    ]
    if not matches:
        raise ValueError(f"no registry name describes a {type(obs).__name__}; names: {', '.join(OBSERVERS)}")
    return max(matches, key=lambda name: len(OBSERVERS[name][1]))
