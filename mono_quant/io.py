"""Saving and loading: qparams as JSON, observer state with ``torch.save``, each checked when read.

- ``save_qparams`` (strict JSON, RFC 8259)::

      {"format": "mono_quant.qparams", "version": 2, "mono_quant_version": str, "model": str,
       "dtype": "int8", "qscheme": "affine", "qmin": int, "qmax": int (FP8: "fp8_max": float instead),
       "calibration_batches": int,
       "layers": {layer: {"best": kind | null, "observers": {kind: {
           "observer": class name, "settings": {constructor keywords}, "dtype": str, "qscheme": str,
           "ch_axis": int | null, "scale": float | [float], "zero_point": int | [int],
           "range": [lo, hi], "sqnr_db": float | null, "seconds": float}}}}}

  JSON has no infinite or NaN numbers: a float that is not finite is written as the string ``"inf"``,
  ``"-inf"`` or ``"nan"`` (``float()`` reads each back), and ``load_qparams`` reads them so. ``sqnr_db``
  is ``null`` and ``best`` is ``null`` where the SQNR could not be measured (the held-out input of the
  layer had no finite, non-zero value). Version 1 wrote no ``null`` there; it still loads.

- ``save_state`` (``torch.save``; loads with ``torch.load(path, weights_only=True)``)::

      {"format": "mono_quant.observer_state", "version": 1, "mono_quant_version": str,
       "observers": {kind: {"class": class name,
                            "layers": {layer: {"kwargs": {constructor keywords, dtype as a name},
                                               "state_dict": observer.state_dict()}}}}}

  ``load_state`` rebuilds fresh observers from it: ``{kind: {layer: observer}}``. Feed them more batches
  to continue calibrating, or merge several runs exactly with
  ``mono_quant.merge_observers([run_a["kl"], run_b["kl"]])``.

Both loaders check what they read (structure, format and version, dtypes and shapes, and the invariants
every observer state keeps) and raise one error type, ``StateFileError``, naming the file, where (kind,
layer, key) and what is wrong. Both savers write through ``write_file``: a failed write leaves an existing
file as it was.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict

import torch

from mono_quant._version import __version__
from mono_quant.core.base import ObserverBase, StateError
from mono_quant.core.qparams import dtype_from_name, dtype_name, fp8_max, is_fp8, quant_range
from mono_quant.core.registry import OBSERVERS, create_observer, observer_name
from mono_quant.files import StateFileError, check_writable, write_file

__all__ = [
    "StateFileError",
    "check_writable",
    "load_qparams",
    "load_state",
    "observer_kwargs",
    "save_qparams",
    "save_state",
    "write_file",
]

STATE_FORMAT = "mono_quant.observer_state"
STATE_VERSIONS = (1,)
QPARAMS_FORMAT = "mono_quant.qparams"
QPARAMS_VERSION = 2
QPARAMS_VERSIONS = (1, 2)

# Bin numbers on the canonical grid: the exponent is never finer than the float32 spacing at the largest
# magnitude seen, so |x| * 2**-e < 2**24 for every value seen (mono_quant.grid), and the bin of every
# value, the origin (the bin of the minimum) included, lies in [-2**24, 2**24).
ORIGIN_LIMIT = 1 << 24


# --- qparams (JSON) --------------------------------------------------------------------------------------


def observer_kwargs(obs: ObserverBase) -> dict:
    """The constructor keywords that rebuild ``obs`` (``dtype`` as a name such as ``"qint8"``): JSON-safe."""
    kwargs = obs.settings()
    kwargs["dtype"] = dtype_name(kwargs["dtype"])
    return kwargs


def _json_float(v: float | None):
    """A float for strict JSON: finite numbers as they are, the others as ``"inf"``, ``"-inf"``, ``"nan"``."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")


def _json_floats(t: torch.Tensor):
    return _json_float(float(t)) if t.dim() == 0 else [_json_float(v) for v in t.tolist()]


def _json_ints(t: torch.Tensor):
    return int(t) if t.dim() == 0 else [int(v) for v in t.tolist()]


def _code_range(dtype: torch.dtype) -> dict:
    """What a qparams file says of the codes: ``qmin`` / ``qmax``, or ``fp8_max`` for FP8."""
    if is_fp8(dtype):
        return {"fp8_max": fp8_max(dtype)}
    qmin, qmax = quant_range(dtype)
    return {"qmin": qmin, "qmax": qmax}


def qparams_json(cmp, model: str = "") -> str:
    """The ``save_qparams`` document of a comparison, as strict JSON text (layout in the module docstring).

    Args:
        cmp: a ``mono_quant.compare.Comparison``.
    """
    out = {
        "format": QPARAMS_FORMAT,
        "version": QPARAMS_VERSION,
        "mono_quant_version": __version__,
        "model": model,
        "dtype": dtype_name(cmp.dtype),
        "qscheme": cmp.qscheme,
        **_code_range(cmp.dtype),
        "calibration_batches": cmp.batches,
        "layers": {},
    }
    for layer, row in cmp.scores.items():
        entry = {"best": cmp.best(layer), "observers": {}}
        for kind, s in row.items():
            kwargs = observer_kwargs(s.observer)
            entry["observers"][kind] = {
                "observer": type(s.observer).__name__,
                "settings": {k: _json_float(v) if isinstance(v, float) else v for k, v in kwargs.items()},
                "dtype": kwargs["dtype"],
                "qscheme": kwargs["qscheme"],
                "ch_axis": s.ch_axis,
                "scale": _json_floats(s.scale),
                "zero_point": _json_ints(s.zero_point),
                "range": [_json_float(s.lo), _json_float(s.hi)],
                "sqnr_db": _json_float(s.sqnr_db),
                "seconds": _json_float(s.seconds),
            }
        out["layers"][layer] = entry
    return json.dumps(out, indent=1, allow_nan=False) + "\n"


def save_qparams(cmp, path: str, model: str = "") -> None:
    """Write every layer's qparams, per observer, as strict JSON (layout in the module docstring).

    Args:
        cmp: a ``mono_quant.compare.Comparison``.

    Raises:
        OSError: the file cannot be written (an existing one is then unchanged).
    """
    write_file(path, qparams_json(cmp, model).encode())


def _read_float(path, value, where: dict) -> float:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StateFileError(path, f"expected a number (or 'inf', '-inf', 'nan'), got {value!r}", **where)
    return float(value)


def _read_scale(path, value, where: dict) -> list[float]:
    values = value if isinstance(value, list) else [value]
    out = [_read_float(path, v, where) for v in values]
    bad = [v for v in out if not (math.isfinite(v) and 0 < v <= torch.finfo(torch.float32).max)]
    if bad or not out:
        shown = bad[0] if bad else "an empty list"
        raise StateFileError(path, f"a scale must be a finite positive float32, got {shown}", **where)
    return out


def _read_zero_point(path, value, qmin: int, qmax: int, where: dict) -> list[int]:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not qmin <= v <= qmax:
            raise StateFileError(
                path, f"a zero point must be an int from {qmin} to {qmax}, got {v!r}", **where
            )
    if not values:
        raise StateFileError(path, "zero_point is an empty list", **where)
    return values


def _expect_dict(path, value, what: str, **where) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        got = type(value).__name__
        raise StateFileError(path, f"{what} must be a dict with str keys, got a {got}", **where)
    return value


def _check_version(path, doc: dict, versions: tuple[int, ...]) -> int:
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in versions:
        saved = doc.get("mono_quant_version")
        by = f" (written by mono_quant {saved})" if isinstance(saved, str) else ""
        readable = ", ".join(map(str, versions))
        raise StateFileError(
            path,
            f"version {version!r}{by} is not one this mono_quant {__version__} reads ({readable}); "
            "a newer file needs a newer mono_quant",
        )
    return version


def load_qparams(path: str) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{layer: {kind: (scale float32, zero_point int32)}}`` from a ``save_qparams`` file.

    Per-channel entries give ``(C,)`` tensors, the others 0-d ones.

    Raises:
        OSError: the file cannot be opened.
        StateFileError: it is not strict JSON, not a qparams file of a version this mono_quant reads, or an
            entry is malformed: a scale that is not a finite positive float32, a zero point outside
            ``[qmin, qmax]``, per-channel lists of different lengths (the message says where).
    """
    with open(path, "rb") as f:
        raw = f.read()
    constants: list[str] = []

    def constant(name: str) -> float:  # NaN / Infinity: not JSON; version 1 wrote them in "range"
        constants.append(name)
        return float(name.replace("Infinity", "inf"))

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(
            path, f"is not JSON ({e}); expected a file written by save_qparams / --save"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != QPARAMS_FORMAT:
        raise StateFileError(
            path,
            f"is not a mono_quant qparams file (its 'format' is not {QPARAMS_FORMAT!r}; written by --save)",
        )
    version = _check_version(path, doc, QPARAMS_VERSIONS)
    if constants and version >= 2:
        raise StateFileError(
            path, f"holds {constants[0]}, which is not JSON (numbers that are not finite are strings)"
        )
    try:
        dtype = dtype_from_name(doc.get("dtype"))
    except (ValueError, TypeError, KeyError):
        raise StateFileError(
            path, f"dtype {doc.get('dtype')!r} is not a quantized dtype name", key="dtype"
        ) from None
    want = _code_range(dtype)
    if {k: doc.get(k) for k in want} != want:
        keys = " / ".join(want)
        got = " / ".join(repr(doc.get(k)) for k in want)
        raise StateFileError(
            path, f"{keys} {got} are not {dtype_name(dtype)}'s {' / '.join(str(v) for v in want.values())}"
        )
    qmin, qmax = (want["qmin"], want["qmax"]) if "qmin" in want else (0, 0)  # FP8: zero point 0
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, entry in _expect_dict(path, doc.get("layers"), "'layers'").items():
        entry = _expect_dict(path, entry, "a layer entry", layer=layer)
        observers = _expect_dict(path, entry.get("observers"), "'observers'", layer=layer)
        best = entry.get("best")
        if not (best is None or best in observers):
            raise StateFileError(path, f"best {best!r} is not one of its observers", layer=layer, key="best")
        out[layer] = {}
        for kind, e in observers.items():
            where = {"kind": kind, "layer": layer}
            e = _expect_dict(path, e, "an observer entry", **where)
            scale = _read_scale(path, e.get("scale"), {**where, "key": "scale"})
            zp = _read_zero_point(path, e.get("zero_point"), qmin, qmax, {**where, "key": "zero_point"})
            ch_axis = e.get("ch_axis")
            per_channel = isinstance(e.get("scale"), list)
            if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
                raise StateFileError(
                    path, f"ch_axis must be an int or null, got {ch_axis!r}", **where, key="ch_axis"
                )
            if per_channel != (ch_axis is not None) or per_channel != isinstance(e.get("zero_point"), list):
                raise StateFileError(
                    path,
                    "per-channel entries (ch_axis an int) hold lists of scales and zero points, "
                    "per-tensor ones (ch_axis null) one number each",
                    **where,
                )
            if len(scale) != len(zp):
                raise StateFileError(path, f"{len(scale)} scales but {len(zp)} zero points", **where)
            shape = (len(scale),) if per_channel else ()
            out[layer][kind] = (
                torch.tensor(scale, dtype=torch.float32).reshape(shape),
                torch.tensor(zp, dtype=torch.int32).reshape(shape),
            )
    return out


# --- observer state (torch.save) -------------------------------------------------------------------------


def _rebuild(class_name: str, kwargs: dict) -> ObserverBase:
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = dtype_from_name(kwargs["dtype"])
    return create_observer(class_name, **kwargs)


def _check_kind(kind: str, obs: ObserverBase) -> str | None:
    """What is wrong when ``kind`` is a registry name that does not describe ``obs`` (``None``: fine)."""
    try:
        cls, preset = OBSERVERS[observer_name(kind)]
    except ValueError:
        return None  # a label of the user's own: nothing to compare with
    settings = obs.settings()
    differ = {k: v for k, v in preset.items() if settings.get(k) != v}
    if type(obs) is not cls or differ:
        means = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in preset.items())})"
        has = f"{type(obs).__name__}({', '.join(f'{k}={settings.get(k)!r}' for k in preset)})"
        return f"the name {kind!r} means {means}, but the observer saved under it is a {has}"
    return None


def save_state(observers: dict[str, dict[str, ObserverBase]], path: str) -> None:
    """``torch.save`` every observer's ``state_dict`` with what rebuilds it (layout in the module docstring).

    Args:
        observers: ``{layer: {kind: observer}}`` as ``mono_quant.compare.calibrate_observers`` returns.

    Raises:
        ValueError: one kind holds observers of different classes, or a kind that is a registry name
            (``"kl"``) holds an observer it does not describe (``load_state`` would refuse the file).
        OSError: the file cannot be written (an existing one is then unchanged).
    """
    by_kind: dict[str, dict] = {}
    for layer, row in observers.items():
        for kind, obs in row.items():
            entry = by_kind.setdefault(kind, {"class": type(obs).__name__, "layers": {}})
            if entry["class"] != type(obs).__name__:
                raise ValueError(f"observer kind {kind!r} mixes {entry['class']} and {type(obs).__name__}")
            wrong = _check_kind(kind, obs)
            if wrong:
                raise ValueError(f"layer {layer!r}: {wrong}")
            sd = obs.state_dict()
            saved = OrderedDict(
                (k, v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()
            )
            saved._metadata = getattr(sd, "_metadata", None)  # the per-module _version, checked on load
            entry["layers"][layer] = {"kwargs": observer_kwargs(obs), "state_dict": saved}
    state = {"format": STATE_FORMAT, "version": 1, "mono_quant_version": __version__, "observers": by_kind}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file(path, buffer.getvalue())


def _state_version(sd) -> int:
    meta = getattr(sd, "_metadata", None) or {}
    version = meta.get("", {}).get("version", 1) if isinstance(meta.get(""), dict) else 1
    return version if isinstance(version, int) else 1


def _load_observer(path: str, class_name, saved, kind: str, layer: str) -> ObserverBase:
    where = {"kind": kind, "layer": layer}
    saved = _expect_dict(path, saved, "a layer entry", **where)
    kwargs = _expect_dict(path, saved.get("kwargs"), "'kwargs'", **where, key="kwargs")
    sd = _expect_dict(path, saved.get("state_dict"), "'state_dict'", **where, key="state_dict")
    try:
        obs = _rebuild(class_name, kwargs)
    except (ValueError, TypeError) as e:
        raise StateFileError(
            path, f"cannot rebuild a {class_name} from {kwargs}: {e}", **where, key="kwargs"
        ) from None
    if type(obs).__name__ != class_name:
        raise StateFileError(path, f"{class_name!r} is not an observer class name", kind=kind, key="class")
    wrong = _check_kind(kind, obs)
    if wrong:
        raise StateFileError(path, wrong, **where, key="kwargs")
    expected = set(obs.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if _state_version(sd) < 2:  # saved before _extra_state existed
        missing.discard("_extra_state")
    if missing or unexpected:
        what = "is missing" if missing else f"is not a key of a {class_name} state"
        raise StateFileError(path, what, **where, key=f"state_dict[{sorted(missing or unexpected)[0]!r}]")
    try:
        obs.load_state_dict(sd)  # checks dtypes, shapes, settings and the state's invariants
    except StateError as e:
        raise StateFileError(path, e.reason, **where, key=e.key) from None
    except (ValueError, RuntimeError, TypeError) as e:
        raise StateFileError(path, str(e).strip().splitlines()[0], **where, key="state_dict") from None
    return obs


def load_state(path: str, map_location="cpu") -> dict[str, dict[str, ObserverBase]]:
    """Fresh observers holding the state saved by ``save_state``: ``{kind: {layer: observer}}``.

    Each observer is rebuilt from its saved class and keywords (a per-channel observer keeps its layer's
    ``ch_axis``), then loads its ``state_dict``, and the state is checked: ``seen`` >= 0 and consistent
    with the batches; the range not NaN, either finite with min <= max or +inf / -inf when nothing finite
    was seen; for histograms counts >= 0 summing to the finite values seen, lying between the bins of the
    min and max, on the canonical grid of that range (exponent in ``[grid.E_MIN, grid.E_MAX]``, origin in
    ``[-2**24, 2**24)``); the keywords agree with the class, with the kind's name (``"kl"`` is a histogram
    with ``method="kl"``) and with the settings the state dict carries.

    Raises:
        OSError: the file cannot be opened.
        StateFileError: it is not a ``save_state`` file of a version this mono_quant reads, or a state in
            it fails a check above (the message says which kind, layer and key).
    """
    with open(path, "rb") as f:
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # a text file, a truncated archive, a pickle with code in it
            text = str(e).strip().splitlines()
            raise StateFileError(
                path,
                f"torch.load(weights_only=True) cannot read it ({type(e).__name__}"
                f"{': ' + text[0][:200] if text else ''}); expected a file written by save_state or "
                "--save-state",
            ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StateFileError(
            path,
            f"is not a mono_quant observer state file (its 'format' is not {STATE_FORMAT!r}; written by "
            "--save-state)",
        )
    _check_version(path, state, STATE_VERSIONS)
    out: dict[str, dict[str, ObserverBase]] = {}
    for kind, entry in _expect_dict(path, state.get("observers"), "'observers'").items():
        entry = _expect_dict(path, entry, "an observer kind entry", kind=kind)
        class_name = entry.get("class")
        if not isinstance(class_name, str):
            raise StateFileError(
                path, f"must be an observer class name, got {class_name!r}", kind=kind, key="class"
            )
        layers = _expect_dict(path, entry.get("layers"), "'layers'", kind=kind)
        out[kind] = {
            layer: _load_observer(path, class_name, saved, kind, layer) for layer, saved in layers.items()
        }
    return out
