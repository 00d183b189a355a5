"""Saving and loading: qparams as JSON, observer state with ``torch.save``, each checked when read.

- ``save_qparams`` (JSON)::

      {"format": "mono_quant.qparams", "version": 1, "mono_quant_version": str, "model": str,
       "dtype": "int8", "qscheme": "affine", "qmin": int, "qmax": int, "calibration_batches": int,
       "layers": {layer: {"best": kind, "observers": {kind: {
           "observer": class name, "settings": {constructor keywords}, "dtype": str, "qscheme": str,
           "ch_axis": int | null, "scale": float | [float], "zero_point": int | [int],
           "range": [lo, hi], "sqnr_db": float | "inf" | "-inf", "seconds": float}}}}}

- ``save_state`` (``torch.save``; loads with ``torch.load(path, weights_only=True)``)::

      {"format": "mono_quant.observer_state", "version": 1, "mono_quant_version": str,
       "observers": {kind: {"class": class name,
                            "layers": {layer: {"kwargs": {constructor keywords, dtype as a name},
                                               "state_dict": observer.state_dict()}}}}}

  ``load_state`` rebuilds fresh observers from it: ``{kind: {layer: observer}}``. Feed them more batches
  to continue calibrating, or merge several runs exactly with
  ``mono_quant.merge_observers([run_a["kl"], run_b["kl"]])``.
"""

from __future__ import annotations

import json
import math

import torch

from mono_quant._version import __version__
from mono_quant.core.base import ObserverBase
from mono_quant.core.qparams import dtype_from_name, dtype_name, quant_range
from mono_quant.core.registry import create_observer

__all__ = ["load_qparams", "load_state", "observer_kwargs", "save_qparams", "save_state"]

STATE_FORMAT = "mono_quant.observer_state"
QPARAMS_FORMAT = "mono_quant.qparams"


def observer_kwargs(obs: ObserverBase) -> dict:
    """The constructor keywords that rebuild ``obs`` (``dtype`` as a name such as ``"qint8"``): JSON-safe."""
    kwargs = obs.settings()
    kwargs["dtype"] = dtype_name(kwargs["dtype"])
    return kwargs


def _rebuild(class_name: str, kwargs: dict) -> ObserverBase:
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = dtype_from_name(kwargs["dtype"])
    return create_observer(class_name, **kwargs)


def _jsonable(t: torch.Tensor, cast):
    return cast(t) if t.dim() == 0 else [cast(v) for v in t.tolist()]


def _json_float(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def save_qparams(cmp, path: str, model: str = "") -> None:
    """Write every layer's qparams, per observer, as JSON (layout in the module docstring).

    Args:
        cmp: a ``mono_quant.compare.Comparison``.
    """
    qmin, qmax = quant_range(cmp.dtype)
    out = {
        "format": QPARAMS_FORMAT,
        "version": 1,
        "mono_quant_version": __version__,
        "model": model,
        "dtype": dtype_name(cmp.dtype),
        "qscheme": cmp.qscheme,
        "qmin": qmin,
        "qmax": qmax,
        "calibration_batches": cmp.batches,
        "layers": {},
    }
    for layer, row in cmp.scores.items():
        entry = {"best": cmp.best(layer), "observers": {}}
        for kind, s in row.items():
            kwargs = observer_kwargs(s.observer)
            entry["observers"][kind] = {
                "observer": type(s.observer).__name__,
                "settings": kwargs,
                "dtype": kwargs["dtype"],
                "qscheme": kwargs["qscheme"],
                "ch_axis": s.ch_axis,
                "scale": _jsonable(s.scale, float),
                "zero_point": _jsonable(s.zero_point, int),
                "range": [s.lo, s.hi],
                "sqnr_db": _json_float(s.sqnr_db),
                "seconds": s.seconds,
            }
        out["layers"][layer] = entry
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def load_qparams(path: str) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{layer: {kind: (scale float32, zero_point int32)}}`` from a ``save_qparams`` file."""
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != QPARAMS_FORMAT:
        raise ValueError(f"{path} is not a mono_quant qparams file (format {data.get('format')!r})")
    return {
        layer: {
            kind: (
                torch.tensor(e["scale"], dtype=torch.float32),
                torch.tensor(e["zero_point"], dtype=torch.int32),
            )
            for kind, e in entry["observers"].items()
        }
        for layer, entry in data["layers"].items()
    }


def save_state(observers: dict[str, dict[str, ObserverBase]], path: str) -> None:
    """``torch.save`` every observer's ``state_dict`` with what rebuilds it (layout in the module docstring).

    Args:
        observers: ``{layer: {kind: observer}}`` as ``mono_quant.compare.calibrate_observers`` returns.
    """
    by_kind: dict[str, dict] = {}
    for layer, row in observers.items():
        for kind, obs in row.items():
            entry = by_kind.setdefault(kind, {"class": type(obs).__name__, "layers": {}})
            if entry["class"] != type(obs).__name__:
                raise ValueError(f"observer kind {kind!r} mixes {entry['class']} and {type(obs).__name__}")
            sd = {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in obs.state_dict().items()
            }
            entry["layers"][layer] = {"kwargs": observer_kwargs(obs), "state_dict": sd}
    state = {"format": STATE_FORMAT, "version": 1, "mono_quant_version": __version__, "observers": by_kind}
    torch.save(state, path)


def load_state(path: str, map_location="cpu") -> dict[str, dict[str, ObserverBase]]:
    """Fresh observers holding the state saved by ``save_state``: ``{kind: {layer: observer}}``.

    Each observer is rebuilt from its saved class and keywords (a per-channel observer keeps its layer's
    ``ch_axis``), then loads its ``state_dict``.

    Raises:
        ValueError: the file is not a ``save_state`` file.
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a mono_quant observer state file (written by --save-state)")
    out: dict[str, dict[str, ObserverBase]] = {}
    for kind, entry in state["observers"].items():
        out[kind] = {}
        for layer, saved in entry["layers"].items():
            obs = _rebuild(entry["class"], saved["kwargs"])
            obs.load_state_dict(saved["state_dict"])
            out[kind][layer] = obs
    return out
