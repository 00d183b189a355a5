"""Compare observers layer by layer (``mono-quant calibrate``): calibrate, score, print the tables.

One calibration pass feeds every observer kind at once (a forward pre-hook per layer calls each observer in
turn and times it), so the model runs once per batch whatever the number of observers. Each observer's
qparams are then scored by the SQNR of that layer's input on a held-out batch, fake-quantized with them.

The kinds compared by default (``COMPARED``) are registry names (``mono_quant.core.registry``):
``minmax``, ``moving_average`` (averaging_constant 0.01), ``kl``, ``mse``, ``percentile`` (99.99; each a
2048-bin histogram) and ``per_channel`` (ch_axis -1 for Linear inputs, 1 for Conv inputs).

A layer whose held-out input has no finite value, or only zeros, has no SQNR to measure (``0 / 0``): its
scores carry ``sqnr_db=None``, the table shows ``n/a``, and it counts in no mean, no win and no winner.
The plot of a comparison is ``mono_quant.plot``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mono_quant.calibration.engine import (
    capture_inputs,
    channel_axis,
    layer_input,
    run_batches,
    target_modules,
)
from mono_quant.calibration.runner import batch_mask, check_mask_key, layer_mask
from mono_quant.core.base import ObserverBase
from mono_quant.core.block_observer import PerBlockObserver
from mono_quant.core.qparams import QuantSpec
from mono_quant.core.quantize import quantization_sqnr
from mono_quant.core.registry import OBSERVERS, create_observer, observer_name

__all__ = [
    "COMPARED",
    "DTYPES",
    "Comparison",
    "Score",
    "calibrate_observers",
    "capture_inputs",
    "compare_observers",
    "format_db",
    "format_summary",
    "format_table",
    "make_observer",
    "score_observers",
    "unmeasurable",
    "unscored",
    "winner_line",
]

COMPARED = ("minmax", "moving_average", "kl", "mse", "percentile", "per_channel")

# the --dtype names of the CLI
DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int4": torch.int4,
    "uint4": torch.uint4,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp8_e4m3fnuz": torch.float8_e4m3fnuz,
    "fp8_e5m2fnuz": torch.float8_e5m2fnuz,
}


# --- observers -------------------------------------------------------------------------------------------


def make_observer(
    kind: str, dtype: torch.dtype, qscheme: str | None, module: nn.Module | None = None
) -> ObserverBase:
    """A fresh observer of ``kind`` (a registry name) for the input of ``module``: a per-channel one along
    the layer's channel axis.

    Raises:
        ValueError: ``kind`` is not a registry name, or names an observer whose qparams are not a scale and
            zero point (``per_block``: block scales), or the observer refuses the settings.
    """
    if issubclass(OBSERVERS[observer_name(kind)][0], PerBlockObserver):
        raise ValueError(
            f"observer {kind!r} gives block scales, which this comparison does not score; use "
            "mono_quant.PerBlockObserver with mono_quant.formats"
        )
    obs = create_observer(kind, dtype=dtype, qscheme=qscheme)
    if obs.ch_axis is not None:
        obs = create_observer(kind, dtype=dtype, qscheme=qscheme, ch_axis=channel_axis(module))
    return obs


def _clip_range(spec: QuantSpec, scale: torch.Tensor, zp: torch.Tensor) -> tuple[float, float]:
    """The outermost values the qparams represent: ``(qmin - zp) * scale`` to ``(qmax - zp) * scale``, or
    ``+-fp8_max * scale`` for FP8 (per channel: the outermost of the channels)."""
    if spec.is_fp8:
        qmin, qmax = -spec.fp8_max, spec.fp8_max
    else:
        qmin, qmax = spec.qmin, spec.qmax
    lo = float(((qmin - zp.to(torch.float64)) * scale).min())
    hi = float(((qmax - zp.to(torch.float64)) * scale).max())
    return lo, hi


# --- calibration -----------------------------------------------------------------------------------------


def calibrate_observers(
    model: nn.Module,
    batches: Sequence,
    kinds: Sequence[str],
    dtype: torch.dtype,
    qscheme: str,
    device: torch.device | str = "cpu",
    progress: bool = False,
    mask_key: str | None = "attention_mask",
) -> tuple[dict[str, dict[str, ObserverBase]], dict[str, dict[str, float]]]:
    """Observe every target layer's input with one observer of each kind, in one pass over ``batches``.

    Args:
        model: on ``device`` already.
        batches: tensors, tuples/lists (``model(*b)``) or dicts (``model(**b)``).
        kinds: observer names (``COMPARED``, or any registry name). dtype, qscheme: as for the observers.
        progress: a tqdm bar over the batches, on stderr.
        mask_key: as for ``run_calibration``: a dict batch's ``batch[mask_key]`` (bool or 0/1) leaves the
            padding out of every input whose leading dims it covers; ``None`` observes every token.

    Returns:
        ``(observers, seconds)``: ``{layer: {kind: observer}}`` and ``{layer: {kind: time spent observing}}``.

    Raises:
        RuntimeError: the model raised on a batch (the message names the batch).
    """
    check_mask_key(mask_key)
    layers = target_modules(model)
    observers = {
        name: {k: make_observer(k, dtype, qscheme, m).to(device) for k in kinds} for name, m in layers.items()
    }
    seconds = {name: dict.fromkeys(kinds, 0.0) for name in layers}
    cuda = torch.device(device).type == "cuda"
    batch = {"mask": None}  # the token mask of the batch being run

    def hook_factory(name: str):
        def hook(_module, args, kwargs):
            x = layer_input(args, kwargs)
            if x is None:
                return
            mask = layer_mask(batch["mask"], x)
            masked = {} if mask is None else {"mask": mask.to(x.device)}
            for kind, obs in observers[name].items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                obs(x, **masked)
                if cuda:
                    torch.cuda.synchronize()
                seconds[name][kind] += time.perf_counter() - t0

        return hook

    def start(b) -> None:
        batch["mask"] = batch_mask(b, mask_key)

    run_batches(model, batches, hook_factory, device=device, progress=progress, on_batch_start=start)
    return observers, seconds


# --- scoring ---------------------------------------------------------------------------------------------


@dataclass
class Score:
    """One observer's result on one layer.

    ``scale`` / ``zero_point``: 0-d, or ``(C,)`` per channel along ``ch_axis``. ``lo``, ``hi``: the clipping
    range the qparams represent, ``(qmin - zp) * scale`` and ``(qmax - zp) * scale`` (per channel: the
    outermost). ``sqnr_db``: SQNR of the held-out input fake-quantized with them; ``None`` where it cannot
    be measured (``unmeasurable``). ``seconds``: observing plus ``calculate_qparams``.
    """

    layer: str
    kind: str
    observer: ObserverBase
    scale: torch.Tensor
    zero_point: torch.Tensor
    lo: float
    hi: float
    sqnr_db: float | None
    seconds: float

    @property
    def ch_axis(self) -> int | None:
        return self.observer.ch_axis


@dataclass
class Comparison:
    """Every ``Score``, grouped ``{layer: {kind: Score}}``, with how it was run.

    ``unmeasured``: ``{layer: why}`` for the layers whose SQNR could not be measured (``sqnr_db`` None).
    """

    scores: dict[str, dict[str, Score]] = field(default_factory=dict)
    dtype: torch.dtype = torch.int8
    qscheme: str = "affine"
    batches: int = 0
    description: str = ""
    unmeasured: dict[str, str] = field(default_factory=dict)

    def measured(self) -> list[str]:
        """The layers with an SQNR for every observer, in model order."""
        return [
            layer for layer, row in self.scores.items() if all(s.sqnr_db is not None for s in row.values())
        ]

    def best(self, layer: str, per_tensor_only: bool = False) -> str | None:
        """The kind with the highest SQNR on ``layer`` (the first listed, on ties); optionally among the
        per-tensor observers only. ``None`` where the SQNR could not be measured."""
        row = self.scores[layer]
        kinds = [
            k for k, s in row.items() if s.sqnr_db is not None and not (per_tensor_only and s.scale.dim() > 0)
        ]
        return max(kinds, key=lambda k: row[k].sqnr_db) if kinds else None


def unmeasurable(x: torch.Tensor | None) -> str | None:
    """Why no SQNR can be measured on a layer's held-out input ``x`` (``None``: it can).

    The SQNR is signal power over noise power on the finite values; without a finite value, or with only
    zeros (which every observer represents exactly), it is ``0 / 0`` and would read as ``inf`` for all.
    """
    if x is None:
        return "the held-out batch did not reach this layer"
    finite = torch.isfinite(x)
    if not bool(finite.any()):
        return "its held-out input has no finite value"
    if not bool((x[finite] != 0).any()):
        return "its held-out input is all zeros"
    return None


def score_observers(
    observers: dict[str, dict[str, ObserverBase]],
    seconds: dict[str, dict[str, float]],
    held_out: dict[str, torch.Tensor],
) -> dict[str, dict[str, Score]]:
    """Qparams of every observer, and the SQNR of its layer's held-out input fake-quantized with them
    (``None`` where ``unmeasurable``).

    Layers whose observers saw no finite value, or with no held-out input, are left out.
    """
    scores: dict[str, dict[str, Score]] = {}
    for layer, row in observers.items():
        x = held_out.get(layer)
        if x is None or any(int(obs.seen[0]) == 0 for obs in row.values()):
            continue
        measurable = unmeasurable(x) is None
        scores[layer] = {}
        for kind, obs in row.items():
            t0 = time.perf_counter()
            scale, zp = obs.calculate_qparams()
            elapsed = seconds[layer][kind] + time.perf_counter() - t0
            lo, hi = _clip_range(obs.spec, scale, zp)
            db = (
                float(quantization_sqnr(x, scale, zp, ch_axis=obs.ch_axis, dtype=obs.dtype))
                if measurable
                else None
            )
            if db is not None and math.isnan(db):
                db = None
            scores[layer][kind] = Score(layer, kind, obs, scale.cpu(), zp.cpu(), lo, hi, db, elapsed)
    return scores


def compare_observers(
    model: nn.Module,
    calibration: Sequence,
    held_out,
    kinds: Sequence[str] = COMPARED,
    dtype: torch.dtype = torch.int8,
    qscheme: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "",
) -> Comparison:
    """Calibrate one observer of each kind on every layer, then score them on the ``held_out`` batch.

    Args:
        model: any ``nn.Module`` on ``device``; its ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` inputs
            are observed.
        calibration: the calibration batches. held_out: one batch, for the SQNR.
        kinds: registry names. dtype: ``torch.int8`` / ``uint8`` / ``int4`` / ``uint4``.
        qscheme: ``"affine"``, ``"symmetric"`` or ``None`` (affine for integer types, symmetric for FP8).
        progress: tqdm bar over the calibration batches.

    Returns:
        ``Comparison``.

    Raises:
        ValueError: unknown kind, or the model has no layer to calibrate.
        RuntimeError: the model raised on a batch.
    """
    observers, seconds = calibrate_observers(model, calibration, kinds, dtype, qscheme, device, progress)
    inputs = capture_inputs(model, held_out, device)
    scores = score_observers(observers, seconds, inputs)
    unmeasured = {layer: unmeasurable(inputs.get(layer)) for layer in scores}
    unmeasured = {layer: why for layer, why in unmeasured.items() if why is not None}
    resolved = QuantSpec(dtype, qscheme).qscheme
    return Comparison(scores, dtype, resolved, len(calibration), description, unmeasured)


def unscored(observers: Mapping[str, Mapping[str, ObserverBase]], batches: int = 0) -> Comparison:
    """A ``Comparison`` of observers that no held-out batch scored: their qparams and clip ranges, every
    ``sqnr_db`` ``None`` (so no layer has a best). What ``save_qparams`` writes for a ``run_calibration``
    result.

    Args:
        observers: ``{layer: {kind: observer}}``; layers whose observers saw nothing finite are left out.
        batches: the calibration batches, for the file.

    Raises:
        ValueError: the observers do not share one dtype and qscheme (a qparams file holds one).
    """
    scores: dict[str, dict[str, Score]] = {}
    specs = set()
    for layer, row in observers.items():
        if not row or any(not obs._has_finite() for obs in row.values()):
            continue
        scores[layer] = {}
        for kind, obs in row.items():
            scale, zp = obs.calculate_qparams()
            lo, hi = _clip_range(obs.spec, scale, zp)
            scores[layer][kind] = Score(layer, kind, obs, scale.cpu(), zp.cpu(), lo, hi, None, 0.0)
            specs.add((obs.dtype, obs.qscheme))
    if len(specs) > 1:
        shown = ", ".join(sorted(f"{d} {q}" for d, q in specs))
        raise ValueError(f"the observers mix dtypes or qschemes ({shown}); a qparams file holds one")
    dtype, qscheme = next(iter(specs)) if specs else (torch.int8, "affine")
    return Comparison(scores, dtype, qscheme, batches)


# --- output ----------------------------------------------------------------------------------------------


def format_db(v: float | None, width: int = 9) -> str:
    if v is None:
        return f"{'n/a':>{width}}"
    if math.isinf(v):
        return f"{'inf' if v > 0 else '-inf':>{width}}"
    return f"{v:>{width}.4g}"


# (title, minimum width, alignment): the minimums keep short tables as they always looked
_COLUMNS = (
    ("layer", 22, "<"),
    ("observer", 15, "<"),
    ("clip range", 21, ">"),
    ("scale", 10, ">"),
    ("zero_pt", 8, ">"),
    ("SQNR dB", 8, ">"),
    ("time ms", 8, ">"),
)


def _table_cells(cmp: Comparison) -> list[tuple[list[str], str]]:
    """Per table row: the cells (without the best mark) and the mark (``"*"`` or ``" "``)."""
    rows = []
    for layer, row in cmp.scores.items():
        best = cmp.best(layer)
        for i, (kind, s) in enumerate(row.items()):
            per_ch = s.scale.dim() > 0
            scale = f"~{float(s.scale.mean()):.4g}" if per_ch else f"{float(s.scale):.4g}"
            zp = f"~{float(s.zero_point.float().mean()):.1f}" if per_ch else f"{int(s.zero_point)}"
            cells = [
                layer if i == 0 else "",
                kind,
                f"[{s.lo:.4g}, {s.hi:.4g}]",
                scale,
                zp,
                format_db(s.sqnr_db, 0),
                f"{s.seconds * 1e3:.2f}",
            ]
            rows.append((cells, "*" if kind == best else " "))
    return rows


def format_table(cmp: Comparison) -> str:
    """The per-layer table: observer, clip range, scale, zero point, SQNR (dB), time (ms); ``*`` = best.

    Per-channel rows show the outermost range and the mean scale / zero point (``~``); ``n/a`` marks an
    SQNR that could not be measured, and a note under the table says why. Columns are as wide as their
    longest cell (long layer names included).
    """
    rows = _table_cells(cmp)
    widths = [
        max([minimum, len(title)] + [len(c[i]) for c, _ in rows])
        for i, (title, minimum, _) in enumerate(_COLUMNS)
    ]

    def line(cells: list[str], mark: str) -> str:
        out = [f"{c:{align}{w}}" for c, w, (_, _, align) in zip(cells, widths, _COLUMNS, strict=True)]
        # the best mark sits right after the SQNR, before the time column
        return " ".join(out[:5]) + f" {out[5]}{mark} {out[6]}"

    header = line([title for title, _, _ in _COLUMNS], " ")
    lines = [header, "-" * len(header)] + [line(cells, mark) for cells, mark in rows]
    for layer, why in cmp.unmeasured.items():
        lines.append(
            f"n/a: {layer or '(model)'}: {why}, so no SQNR is measured there; it counts in no mean or win"
        )
    return "\n".join(lines)


def format_summary(cmp: Comparison) -> str:
    """Per observer: mean SQNR over the layers where it was measured, layers won, total time."""
    kinds = list(next(iter(cmp.scores.values()))) if cmp.scores else []
    measured = cmp.measured()
    wins = {k: 0 for k in kinds}
    for layer in measured:
        wins[cmp.best(layer)] += 1
    width = max([15, *map(len, kinds)])
    lines = [f"{'observer':<{width}} {'mean SQNR dB':>12} {'layers won':>10} {'total ms':>9}"]
    for k in kinds:
        dbs = [cmp.scores[layer][k].sqnr_db for layer in measured]
        total = sum(row[k].seconds for row in cmp.scores.values())
        mean = sum(dbs) / len(dbs) if dbs else None
        lines.append(f"{k:<{width}} {format_db(mean, 12)} {wins[k]:>10} {total * 1e3:>9.1f}")
    return "\n".join(lines)


def _wins(cmp: Comparison, per_tensor_only: bool = False) -> list[tuple[str, int]]:
    wins: dict[str, int] = {}
    for layer in cmp.measured():
        best = cmp.best(layer, per_tensor_only)
        if best is not None:
            wins[best] = wins.get(best, 0) + 1
    return sorted(wins.items(), key=lambda kv: -kv[1])


def winner_line(cmp: Comparison) -> str:
    """One line: which observer had the best SQNR on the most layers, and the runners-up.

    Only layers with a measured SQNR count. When a per-channel observer wins, the per-tensor ranking
    follows (``;``): per-channel activation quantization is not what most int8 matmul kernels can run, so
    that is often the real choice.
    """
    if not cmp.scores:
        return "no layer saw finite data: nothing to compare"
    measured = cmp.measured()
    if not measured:
        return "no layer had a measurable SQNR on the held-out batch (see n/a above): no winner"
    n = len(measured)
    skipped = len(cmp.scores) - n
    note = f"; {skipped} layer{'s' if skipped > 1 else ''} n/a" if skipped else ""

    def ranking(wins: list[tuple[str, int]]) -> str:
        (top, count), rest = wins[0], wins[1:]
        tail = f" ({', '.join(f'{k} {v}' for k, v in rest)})" if rest else ""
        return f"{top}, best SQNR on {count} of {n} layers{tail}"

    line = f"winner: {ranking(_wins(cmp))}"
    row = next(iter(cmp.scores.values()))
    per_channel = [k for k, s in row.items() if s.scale.dim() > 0]
    if per_channel and len(per_channel) < len(row) and _wins(cmp)[0][0] in per_channel:
        line += f"; among per-tensor observers: {ranking(_wins(cmp, per_tensor_only=True))}"
    return line + note
