"""Export calibrated qparams to the files inference engines read: a TensorRT calibration cache, safetensors
with the tensor names of vLLM's compressed-tensors loader, or mono_quant's qparams JSON.

``export(result, path, format)`` takes a ``CalibrationResult`` (``run_calibration``), a mapping
``{layer: observer}``, or the CLI's ``Comparison`` (several observers per layer: ``observer="best"`` picks,
per layer, the one with the best held-out SQNR among those the format can hold; a registry name picks that
kind on every layer). Layer names are the model's ``named_modules()`` names (no ``_orig_mod.``).

Formats:

- ``"tensorrt"``: TensorRT's calibration cache (``IInt8Calibrator.readCalibrationCache``, ``trtexec
  --calib``)::

      TRT-8601-EntropyCalibration2
      layers.0.self_attn.q_proj: 3c010204

  One line per tensor: its name, then the big-endian bits of the float32 scale ``amax / 127`` as 8 hex
  digits (symmetric int8 with codes in ``[-127, 127]``, as TensorRT quantizes). ``amax`` is the larger end
  of the range the observer's qparams come from (for ``kl`` / ``mse`` / ``percentile`` the searched range).
  The header names TensorRT's version and calibrator; TensorRT uses the cache only when the calibrator it is
  given reports that algorithm, and recalibrates otherwise. We write ``EntropyCalibration2`` by default,
  because that is the calibrator ``trtexec --calib`` and most TensorRT samples use (pass ``calibrator=`` for
  ``MinMaxCalibration`` and the others; what the scales mean does not depend on it). Holds per-tensor
  symmetric int8 only (``dtype=torch.qint8`` / ``torch.int8``, ``qscheme="symmetric"``).

- ``"safetensors"``: per layer ``<name>.input_scale`` (float32 ``[1]``), ``<name>.input_zero_point`` (int8
  ``[1]``, affine only) and ``<name>.weight_scale`` (float32 ``[1]`` per tensor, ``[out, 1]`` per output
  channel): the names and shapes vLLM's compressed-tensors schemes register for static per-tensor int8
  (``CompressedTensorsW8A8Int8``) and FP8 (``CompressedTensorsW8A8Fp8``) activations, to merge into a
  checkpoint whose quantized weights are the user's. The weight scales come from a MinMax (``"tensor"``) or
  per-output-channel MinMax (``"channel"``) observer over each layer's ``weight``, symmetric, in the
  activations' dtype. The file's metadata (``__metadata__``) holds ``format``, ``version`` and
  ``quantization``, a JSON object: ``{"dtype", "input": {"scheme", "granularity": "tensor", "static":
  true}, "weight": {"scheme": "symmetric", "granularity"} or null, "observers": {layer: kind}, "groups":
  {layer: [layers sharing its input]}}``. Holds int8 (affine or symmetric) and ``float8_e4m3fn``.

- ``"json"``: the ``mono_quant.io.save_qparams`` document (``--save``), every observer of every layer.

A format that cannot hold an observer's qparams (affine into TensorRT, per-channel activations, uint8, int4,
``reduce_range``) is a ``ValueError`` naming the layer, the observer and what the format holds, raised
before anything is written; a file is written once, whole (``mono_quant.io.write_file``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mono_quant._version import __version__
from mono_quant.core.base import ObserverBase
from mono_quant.core.qparams import dtype_name
from mono_quant.core.registry import create_observer, name_of, observer_name

__all__ = [
    "FORMATS",
    "HOLDS",
    "TRT_CALIBRATORS",
    "TRT_VERSION",
    "Exported",
    "check_observers",
    "export",
    "refusal",
    "safetensors_bytes",
    "tensorrt_cache",
]

FORMATS = ("tensorrt", "safetensors", "json")
# the algorithms a TensorRT calibrator reports (IInt8Calibrator::getAlgorithm), as the cache header names them
TRT_CALIBRATORS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
TRT_VERSION = 8601  # TensorRT 8.6.1, the last release line built around implicit (calibrated) int8
EXPORT_FORMAT = "mono_quant.export"
EXPORT_VERSION = 1
WEIGHT_GRANULARITIES = ("channel", "tensor")
_INT8 = (torch.qint8, torch.int8)
_ST_DTYPES = {torch.float32: "F32", torch.int8: "I8"}


@dataclass
class Exported:
    """What ``export`` wrote: ``layers`` ``{layer: observer kind}``, ``skipped`` ``{layer: why}``."""

    format: str
    path: str
    layers: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


# what each format holds, for the error messages
HOLDS = {
    "tensorrt": "per-tensor symmetric int8 (dtype qint8 or int8, qscheme 'symmetric')",
    "safetensors": "per-tensor int8 (affine or symmetric) or float8_e4m3fn activation scales",
    "json": "any observer's qparams",
}


def _why_not(format: str, obs: ObserverBase) -> str | None:
    """What ``obs`` is that ``format`` does not hold, in a few words (``None``: it holds it)."""
    if format == "json":
        return None
    if getattr(obs, "block_size", None) is not None:
        return f"{type(obs).__name__} gives block scales"
    if obs.num_segments is not None:
        return (
            f"{type(obs).__name__} keeps {obs.num_segments} experts (segments): one scale per expert; "
            "export them as json, or read result.qparams(empty=...) and "
            "mono_quant.calibration.expert_weight_qparams"
        )
    has = f"{type(obs).__name__}(dtype={dtype_name(obs.dtype)}, qscheme={obs.qscheme!r})"
    if obs.ch_axis is not None:
        return f"{has} is per channel (ch_axis={obs.ch_axis})"
    if obs.reduce_range:
        return f"{has} has reduce_range=True (the formats use the full 8-bit range)"
    if format == "tensorrt" and (obs.dtype not in _INT8 or obs.qscheme != "symmetric"):
        return f"{has} is not"
    if format == "safetensors" and obs.dtype not in (*_INT8, getattr(torch, "float8_e4m3fn", None)):
        return f"{has} is not"
    return None


def refusal(format: str, obs: ObserverBase) -> str | None:
    """Why ``format`` cannot hold the qparams of ``obs``, as a sentence (``None``: it can).

    Raises:
        ValueError: ``format`` is not one of ``FORMATS``.
    """
    _check_format(format)
    why = _why_not(format, obs)
    return None if why is None else f"{format} holds {HOLDS[format]}; {why}"


def _check_format(format) -> str:
    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is not one of {', '.join(map(repr, FORMATS))}")
    return format


def check_observers(
    format: str,
    row: Mapping[str, ObserverBase],
    observer: str = "best",
    layer: str | None = None,
    sqnr_db: Mapping[str, float | None] | None = None,
) -> str:
    """The kind of ``row`` (``{kind: observer}``, one layer's) that ``format`` exports under ``observer``.

    Args:
        observer: ``"best"``: the kind with the highest ``sqnr_db`` that the format can hold (without
            SQNRs, or on ties, the first listed); else a registry name that must be in ``row``.
        layer: named in the messages. sqnr_db: ``{kind: held-out SQNR or None}``.

    Raises:
        ValueError: no kind of ``row`` can be held, or ``observer`` names a kind that is not in ``row`` or
            cannot be held (the message says why and what the format holds).
    """
    _check_format(format)
    where = f"layer {layer!r}: " if layer is not None else ""
    if observer == "best":
        reasons = {kind: _why_not(format, obs) for kind, obs in row.items()}
        held = [kind for kind, why in reasons.items() if why is None]
        if held:
            db = sqnr_db or {}
            return max(held, key=lambda k: -float("inf") if db.get(k) is None else db[k])
        shown = "; ".join(f"{kind}: {why}" for kind, why in reasons.items())
        raise ValueError(
            f"{where}no observer can be exported to {format}, which holds {HOLDS[format]} ({shown})"
        )
    kind = observer if observer in row else _registry_name(observer)
    if kind not in row:
        raise ValueError(f"{where}observer {observer!r} is not among those calibrated: {', '.join(row)}")
    why = refusal(format, row[kind])
    if why is not None:
        raise ValueError(f"{where}observer {kind!r}: {why}")
    return kind


def _registry_name(name: str) -> str | None:
    try:
        return observer_name(name)
    except ValueError:
        return None


# --- what to export --------------------------------------------------------------------------------------


def _rows(result) -> tuple[dict[str, dict[str, tuple[ObserverBase, float | None]]], dict, dict, int]:
    """``({layer: {kind: (observer, sqnr_db)}}, groups, skipped, batches)`` of any accepted ``result``."""
    from mono_quant.compare import Comparison

    if isinstance(result, Comparison):
        rows = {
            layer: {kind: (s.observer, s.sqnr_db) for kind, s in row.items()}
            for layer, row in result.scores.items()
        }
        return rows, {}, {}, result.batches
    if not isinstance(result, Mapping) or not all(isinstance(o, ObserverBase) for o in result.values()):
        raise TypeError(
            f"export takes a CalibrationResult, a dict {{layer: observer}} or a Comparison, got "
            f"{type(result).__name__}"
        )
    rows, skipped = {}, {}
    for layer, obs in result.items():
        if not obs._has_finite():
            skipped[layer] = "its observer saw no finite value"
            continue
        try:
            kind = name_of(obs)
        except ValueError:
            kind = type(obs).__name__
        rows[layer] = {kind: (obs, None)}
    groups = result.groups() if callable(getattr(result, "groups", None)) else {}
    return rows, groups, skipped, getattr(result, "batches", 0)


def _choose(rows: dict, format: str, observer: str) -> dict[str, tuple[str, ObserverBase]]:
    """``{layer: (kind, observer)}``: per layer the kind ``check_observers`` picks, best SQNR first."""
    chosen = {}
    for layer, row in rows.items():
        observers, db = {k: v[0] for k, v in row.items()}, {k: v[1] for k, v in row.items()}
        kind = check_observers(format, observers, observer, layer, db)
        chosen[layer] = (kind, row[kind][0])
    specs = {(obs.dtype, obs.qscheme) for _, obs in chosen.values()}
    if format != "json" and len(specs) > 1:
        shown = ", ".join(sorted(f"{dtype_name(d)} {q}" for d, q in specs))
        raise ValueError(f"{format} export holds one dtype and qscheme; the observers mix {shown}")
    return chosen


# --- the formats -----------------------------------------------------------------------------------------


def _amax(obs: ObserverBase) -> torch.Tensor:
    """float32 0-d: the larger end of the range the observer's qparams come from (the searched one for a
    histogram)."""
    obs._check_finite_seen()
    lo, hi = obs._range()
    lo, hi = lo.detach().float().cpu(), hi.detach().float().cpu()
    return torch.maximum(torch.clamp(-lo, min=0), torch.clamp(hi, min=0))


def tensorrt_cache(
    chosen: Mapping[str, ObserverBase],
    calibrator: str = "EntropyCalibration2",
    version: int = TRT_VERSION,
    tensor_names: Mapping[str, str] | None = None,
) -> str:
    """The text of a TensorRT calibration cache (layout in the module docstring).

    Args:
        chosen: ``{layer: observer}``, each per-tensor symmetric int8.
        calibrator: one of ``TRT_CALIBRATORS``. version: TensorRT's version number in the header
            (``NV_TENSORRT_VERSION``: 8601 for 8.6.1).
        tensor_names: ``{layer: TensorRT tensor name}`` (an ONNX graph's names); a layer not in it keeps its
            own name.

    Raises:
        ValueError: an unknown calibrator, a bad version, or a tensor name with a line break.
    """
    if calibrator not in TRT_CALIBRATORS:
        raise ValueError(f"calibrator {calibrator!r} is not one of {', '.join(TRT_CALIBRATORS)}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version={version!r} must be TensorRT's version number, e.g. {TRT_VERSION}")
    lines = [f"TRT-{version}-{calibrator}"]
    for layer, obs in chosen.items():
        name = (tensor_names or {}).get(layer, layer)
        if "\n" in name or "\r" in name or not name:
            raise ValueError(f"tensor name {name!r} (layer {layer!r}) must be non-empty, on one line")
        # float32 division, as TensorRT computes amax / 127.0f; never below the observer's smallest scale
        scale = torch.clamp(_amax(obs) / torch.tensor(127.0), min=obs.eps)
        lines.append(f"{name}: {struct.pack('>f', float(scale)).hex()}")
    return "\n".join(lines) + "\n"


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """``tensors`` (float32 / int8) in the safetensors layout: an 8-byte little-endian header length, the
    JSON header (names, dtypes, shapes, offsets, ``__metadata__``) padded to 8 bytes, the little-endian data.

    Raises:
        TypeError: a tensor of another dtype, or metadata that is not ``str -> str``.
    """
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps str to str")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: cannot write a {t.dtype} tensor (float32 or int8)")
        arr = t.detach().cpu().contiguous().numpy()
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        end = offset + len(data)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _weight_scales(model: nn.Module, layers, dtype: torch.dtype, granularity: str) -> dict:
    """``{layer: weight scale}`` (float32 ``[1]`` or ``[out, 1]``) from a symmetric MinMax observer of each
    layer's ``weight``."""
    from mono_quant.group import calibrate_weights

    root = getattr(model, "_orig_mod", model)
    modules = dict(root.named_modules())
    for layer in layers:
        weight = getattr(modules.get(layer), "weight", None)
        if not isinstance(weight, torch.Tensor):
            why = "is not a module of the model" if layer not in modules else "has no weight tensor"
            raise ValueError(f"layer {layer!r} {why}, so it has no weight_scale; pass weights=None")
    kind = "per_channel" if granularity == "channel" else "minmax"
    kwargs = {"dtype": dtype, "qscheme": "symmetric"} | ({"ch_axis": 0} if kind == "per_channel" else {})
    observers = calibrate_weights(
        {layer: modules[layer] for layer in layers}, lambda: create_observer(kind, **kwargs)
    )
    out = {}
    for layer, obs in observers.items():
        scale, _ = obs.calculate_qparams()
        scale = scale.detach().float().cpu()
        out[layer] = scale.reshape(-1, 1) if granularity == "channel" else scale.reshape(1)
    return out


def _safetensors(chosen: dict, groups: dict, model, weights) -> bytes:
    obs0 = next(iter(chosen.values()))[1] if chosen else None
    dtype = obs0.dtype if obs0 is not None else torch.qint8
    affine = obs0 is not None and obs0.qscheme == "affine"
    scales = _weight_scales(model, list(chosen), dtype, weights) if weights and chosen else {}
    tensors = {}
    for layer, (_, obs) in chosen.items():
        prefix = f"{layer}." if layer else ""
        scale, zp = obs.calculate_qparams()
        tensors[prefix + "input_scale"] = scale.detach().float().cpu().reshape(1)
        if affine:
            tensors[prefix + "input_zero_point"] = zp.detach().cpu().to(torch.int8).reshape(1)
        if layer in scales:
            tensors[prefix + "weight_scale"] = scales[layer]
    quantization = {
        "dtype": dtype_name(torch.int8 if dtype in _INT8 else dtype),
        "input": {"scheme": "affine" if affine else "symmetric", "granularity": "tensor", "static": True},
        "weight": {"scheme": "symmetric", "granularity": weights} if weights else None,
        "observers": {layer: kind for layer, (kind, _) in chosen.items()},
        "groups": {k: v for k, v in groups.items() if k in chosen},
    }
    metadata = {
        "format": EXPORT_FORMAT,
        "version": str(EXPORT_VERSION),
        "mono_quant_version": __version__,
        "quantization": json.dumps(quantization, sort_keys=True),
    }
    return safetensors_bytes(tensors, metadata)


def export(
    result,
    path: str,
    format: str = "json",
    *,
    observer: str = "best",
    model: nn.Module | None = None,
    weights: str | None = "channel",
    calibrator: str = "EntropyCalibration2",
    trt_version: int = TRT_VERSION,
    tensor_names: Mapping[str, str] | None = None,
) -> Exported:
    """Write the qparams of ``result`` to ``path`` in ``format`` (see the module docstring).

    Args:
        result: a ``CalibrationResult``, a dict ``{layer: observer}``, or a ``mono_quant.compare.Comparison``.
        path: the file; replaced only once the new one is complete.
        format: ``"tensorrt"``, ``"safetensors"`` or ``"json"``.
        observer: for a comparison, per layer: ``"best"`` (the best SQNR among the observers the format can
            hold) or a registry name; for a ``CalibrationResult``, ``"best"`` or its observer's name.
        model: the calibrated model; ``"safetensors"`` reads each layer's ``weight`` from it.
        weights: ``"safetensors"`` only: ``"channel"`` (``weight_scale [out, 1]``), ``"tensor"`` (``[1]``), or
            ``None`` (input scales only, no model needed).
        calibrator, trt_version, tensor_names: ``"tensorrt"`` only (``tensorrt_cache``).

    Returns:
        ``Exported``: the layers written with the observer kind of each, and the layers left out (an observer
        that saw no finite value) with why.

    Raises:
        ValueError: an unknown format or weight granularity, an observer the format cannot hold (naming the
            layer, the observer and what the format holds), safetensors weights without ``model`` or for a
            layer without a weight. Nothing is written then.
        TypeError: ``result`` is none of the accepted kinds.
        OSError: the file cannot be written (an existing one is then unchanged).
    """
    from mono_quant import io
    from mono_quant.compare import unscored

    _check_format(format)
    if weights not in (*WEIGHT_GRANULARITIES, None):
        raise ValueError(f"weights={weights!r} is not one of 'channel', 'tensor' or None")
    if format == "safetensors" and weights and model is None:
        raise ValueError(
            "the safetensors export computes weight_scale from the model's weights: pass model=, or "
            "weights=None for input scales only"
        )
    rows, groups, skipped, batches = _rows(result)
    chosen = _choose(rows, format, observer)
    if format == "json":
        from mono_quant.compare import Comparison

        cmp = result if isinstance(result, Comparison) else unscored(
            {layer: {kind: obs} for layer, (kind, obs) in chosen.items()}, batches
        )  # fmt: skip
        data = io.qparams_json(cmp).encode()
    elif format == "tensorrt":
        data = tensorrt_cache(
            {layer: obs for layer, (_, obs) in chosen.items()}, calibrator, trt_version, tensor_names
        ).encode()
    else:
        data = _safetensors(chosen, groups, model, weights)
    io.write_file(path, data)
    return Exported(format, str(path), {layer: kind for layer, (kind, _) in chosen.items()}, skipped)
