"""Compare observers layer by layer (``mono-quant calibrate``): calibrate, score, print, plot.

One calibration pass feeds every observer kind at once (a forward pre-hook per layer calls each observer in
turn and times it), so the model runs once per batch whatever the number of observers. Each observer's
qparams are then scored by the SQNR of that layer's input on a held-out batch, fake-quantized with them.

The kinds compared by default (``COMPARED``) are registry names (``mono_quant.core.registry``):
``minmax``, ``moving_average`` (averaging_constant 0.01), ``kl``, ``mse``, ``percentile`` (99.99; each a
2048-bin histogram) and ``per_channel`` (ch_axis -1 for Linear inputs, 1 for Conv inputs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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
from mono_quant.core.base import ObserverBase
from mono_quant.core.observers import HistogramObserver
from mono_quant.core.qparams import dtype_name, quantization_sqnr
from mono_quant.core.registry import create_observer

__all__ = [
    "COMPARED",
    "DTYPES",
    "Comparison",
    "Score",
    "calibrate_observers",
    "capture_inputs",
    "compare_observers",
    "format_summary",
    "format_table",
    "make_observer",
    "plot_comparison",
    "score_observers",
    "winner_line",
]

COMPARED = ("minmax", "moving_average", "kl", "mse", "percentile", "per_channel")

# the --dtype names of the CLI
DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int4": torch.int4,
    "uint4": torch.uint4,
}


# --- observers -------------------------------------------------------------------------------------------


def make_observer(
    kind: str, dtype: torch.dtype, qscheme: str, module: nn.Module | None = None
) -> ObserverBase:
    """A fresh observer of ``kind`` (a registry name) for the input of ``module``: a per-channel one along
    the layer's channel axis.

    Raises:
        ValueError: ``kind`` is not a registry name.
    """
    obs = create_observer(kind, dtype=dtype, qscheme=qscheme)
    if obs.ch_axis is not None:
        obs = create_observer(kind, dtype=dtype, qscheme=qscheme, ch_axis=channel_axis(module))
    return obs


# --- calibration -----------------------------------------------------------------------------------------


def calibrate_observers(
    model: nn.Module,
    batches: Sequence,
    kinds: Sequence[str],
    dtype: torch.dtype,
    qscheme: str,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, dict[str, ObserverBase]], dict[str, dict[str, float]]]:
    """Observe every target layer's input with one observer of each kind, in one pass over ``batches``.

    Args:
        model: on ``device`` already.
        batches: tensors, tuples/lists (``model(*b)``) or dicts (``model(**b)``).
        kinds: observer names (``COMPARED``, or any registry name). dtype, qscheme: as for the observers.
        progress: a tqdm bar over the batches, on stderr.

    Returns:
        ``(observers, seconds)``: ``{layer: {kind: observer}}`` and ``{layer: {kind: time spent observing}}``.

    Raises:
        RuntimeError: the model raised on a batch (the message names the batch).
    """
    layers = target_modules(model)
    observers = {
        name: {k: make_observer(k, dtype, qscheme, m).to(device) for k in kinds} for name, m in layers.items()
    }
    seconds = {name: dict.fromkeys(kinds, 0.0) for name in layers}
    cuda = torch.device(device).type == "cuda"

    def hook_factory(name: str):
        def hook(_module, args, kwargs):
            x = layer_input(args, kwargs)
            if x is None:
                return
            for kind, obs in observers[name].items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                obs(x)
                if cuda:
                    torch.cuda.synchronize()
                seconds[name][kind] += time.perf_counter() - t0

        return hook

    run_batches(model, batches, hook_factory, device=device, progress=progress)
    return observers, seconds


# --- scoring ---------------------------------------------------------------------------------------------


@dataclass
class Score:
    """One observer's result on one layer.

    ``scale`` / ``zero_point``: 0-d, or ``(C,)`` per channel along ``ch_axis``. ``lo``, ``hi``: the clipping
    range the qparams represent, ``(qmin - zp) * scale`` and ``(qmax - zp) * scale`` (per channel: the
    outermost). ``sqnr_db``: SQNR of the held-out input fake-quantized with them. ``seconds``: observing
    plus ``calculate_qparams``.
    """

    layer: str
    kind: str
    observer: ObserverBase
    scale: torch.Tensor
    zero_point: torch.Tensor
    lo: float
    hi: float
    sqnr_db: float
    seconds: float

    @property
    def ch_axis(self) -> int | None:
        return self.observer.ch_axis


@dataclass
class Comparison:
    """Every ``Score``, grouped ``{layer: {kind: Score}}``, with how it was run."""

    scores: dict[str, dict[str, Score]] = field(default_factory=dict)
    dtype: torch.dtype = torch.int8
    qscheme: str = "affine"
    batches: int = 0
    description: str = ""

    def best(self, layer: str, per_tensor_only: bool = False) -> str:
        """The kind with the highest SQNR on ``layer`` (the first listed, on ties); optionally among the
        per-tensor observers only."""
        row = self.scores[layer]
        kinds = [k for k in row if not (per_tensor_only and row[k].scale.dim() > 0)]
        return max(kinds, key=lambda k: row[k].sqnr_db)


def score_observers(
    observers: dict[str, dict[str, ObserverBase]],
    seconds: dict[str, dict[str, float]],
    held_out: dict[str, torch.Tensor],
) -> dict[str, dict[str, Score]]:
    """Qparams of every observer, and the SQNR of its layer's held-out input fake-quantized with them.

    Layers whose observers saw no finite value, or with no held-out input, are left out.
    """
    scores: dict[str, dict[str, Score]] = {}
    for layer, row in observers.items():
        x = held_out.get(layer)
        if x is None or any(int(obs.seen[0]) == 0 for obs in row.values()):
            continue
        scores[layer] = {}
        for kind, obs in row.items():
            t0 = time.perf_counter()
            scale, zp = obs.calculate_qparams()
            elapsed = seconds[layer][kind] + time.perf_counter() - t0
            qmin, qmax = obs.spec.qmin, obs.spec.qmax
            lo = float(((qmin - zp.to(torch.float64)) * scale).min())
            hi = float(((qmax - zp.to(torch.float64)) * scale).max())
            db = float(quantization_sqnr(x, scale, zp, qmin, qmax, obs.ch_axis))
            scores[layer][kind] = Score(layer, kind, obs, scale.cpu(), zp.cpu(), lo, hi, db, elapsed)
    return scores


def compare_observers(
    model: nn.Module,
    calibration: Sequence,
    held_out,
    kinds: Sequence[str] = COMPARED,
    dtype: torch.dtype = torch.int8,
    qscheme: str = "affine",
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
        qscheme: ``"affine"`` or ``"symmetric"``. progress: tqdm bar over the calibration batches.

    Returns:
        ``Comparison``.

    Raises:
        ValueError: unknown kind, or the model has no layer to calibrate.
        RuntimeError: the model raised on a batch.
    """
    observers, seconds = calibrate_observers(model, calibration, kinds, dtype, qscheme, device, progress)
    inputs = capture_inputs(model, held_out, device)
    scores = score_observers(observers, seconds, inputs)
    return Comparison(scores, dtype, qscheme, len(calibration), description)


# --- output ----------------------------------------------------------------------------------------------


def _fmt(v: float, width: int = 9) -> str:
    if math.isinf(v):
        return f"{'inf' if v > 0 else '-inf':>{width}}"
    return f"{v:>{width}.4g}"


def format_table(cmp: Comparison) -> str:
    """The per-layer table: observer, clip range, scale, zero point, SQNR (dB), time (ms); ``*`` = best.

    Per-channel rows show the outermost range and the mean scale / zero point (``~``).
    """
    header = (
        f"{'layer':<22} {'observer':<15} {'clip range':>21} {'scale':>10} {'zero_pt':>8} "
        f"{'SQNR dB':>8}  {'time ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for layer, row in cmp.scores.items():
        best = cmp.best(layer)
        for i, (kind, s) in enumerate(row.items()):
            per_ch = s.scale.dim() > 0
            scale = f"~{float(s.scale.mean()):.4g}" if per_ch else f"{float(s.scale):.4g}"
            zp = f"~{float(s.zero_point.float().mean()):.1f}" if per_ch else f"{int(s.zero_point)}"
            rng = f"[{s.lo:.4g}, {s.hi:.4g}]"
            mark = "*" if kind == best else " "
            name = layer if i == 0 else ""
            lines.append(
                f"{name:<22} {kind:<15} {rng:>21} {scale:>10} {zp:>8} {_fmt(s.sqnr_db, 8)}{mark} "
                f"{s.seconds * 1e3:>8.2f}"
            )
    return "\n".join(lines)


def format_summary(cmp: Comparison) -> str:
    """Per observer: mean SQNR over the layers, layers won, total time."""
    kinds = list(next(iter(cmp.scores.values()))) if cmp.scores else []
    wins = {k: 0 for k in kinds}
    for layer in cmp.scores:
        wins[cmp.best(layer)] += 1
    lines = [f"{'observer':<15} {'mean SQNR dB':>12} {'layers won':>10} {'total ms':>9}"]
    for k in kinds:
        dbs = [row[k].sqnr_db for row in cmp.scores.values()]
        total = sum(row[k].seconds for row in cmp.scores.values())
        lines.append(f"{k:<15} {_fmt(sum(dbs) / len(dbs), 12)} {wins[k]:>10} {total * 1e3:>9.1f}")
    return "\n".join(lines)


def _wins(cmp: Comparison, per_tensor_only: bool = False) -> list[tuple[str, int]]:
    wins: dict[str, int] = {}
    for layer in cmp.scores:
        best = cmp.best(layer, per_tensor_only)
        wins[best] = wins.get(best, 0) + 1
    return sorted(wins.items(), key=lambda kv: -kv[1])


def winner_line(cmp: Comparison) -> str:
    """One line: which observer had the best SQNR on the most layers, and the runners-up.

    When a per-channel observer wins, the per-tensor ranking follows (``;``): per-channel activation
    quantization is not what most int8 matmul kernels can run, so that is often the real choice.
    """
    if not cmp.scores:
        return "no layer saw finite data: nothing to compare"
    n = len(cmp.scores)

    def ranking(wins: list[tuple[str, int]]) -> str:
        (top, count), rest = wins[0], wins[1:]
        tail = f" ({', '.join(f'{k} {v}' for k, v in rest)})" if rest else ""
        return f"{top}, best SQNR on {count} of {n} layers{tail}"

    line = f"winner: {ranking(_wins(cmp))}"
    row = next(iter(cmp.scores.values()))
    per_channel = [k for k, s in row.items() if s.scale.dim() > 0]
    if per_channel and len(per_channel) < len(row) and _wins(cmp)[0][0] in per_channel:
        line += f"; among per-tensor observers: {ranking(_wins(cmp, per_tensor_only=True))}"
    return line


# --- plot ------------------------------------------------------------------------------------------------

_COLORS = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown")


def _histogram(
    row: dict[str, Score], held_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(counts, edges, source)``: a histogram observer's exact calibration histogram when one ran, else a
    256-bin histogram of the held-out input."""
    for s in row.values():
        obs = s.observer
        if isinstance(obs, HistogramObserver) and obs.histogram_counts is not None:
            counts, edges = obs.histogram_counts.cpu(), obs.bin_edges.cpu()
            nz = torch.nonzero(counts).flatten()
            first, last = int(nz[0]), int(nz[-1]) + 1
            # merge neighbours down to at most 512 bars so the plot stays readable
            k = max(1, math.ceil((last - first) / 512))
            counts = counts[first:last]
            pad = (-counts.shape[0]) % k
            counts = torch.cat([counts, counts.new_zeros(pad)]).view(-1, k).sum(1)
            edges = edges[first : last + pad + 1 : k]
            return counts, edges, "calibration data"
    x = held_out.detach().float().flatten().cpu()
    x = x[torch.isfinite(x)]
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        hi = lo + 1.0
    counts = torch.histc(x, bins=256, min=lo, max=hi)
    return counts, torch.linspace(lo, hi, 257), "held-out batch"


def plot_comparison(cmp: Comparison, path: str, held_out: dict[str, torch.Tensor] | None = None) -> None:
    """Per layer: the activation histogram (log counts) with each observer's clipping range drawn on it.

    Imports matplotlib (Agg backend) only here.

    Raises:
        NotImplementedError: matplotlib is not installed (``pip install 'mono_quant[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NotImplementedError(
            "--plot needs matplotlib, which is not installed: pip install 'mono_quant[plot]'"
        ) from None
    layers = list(cmp.scores)
    cols = min(3, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers, strict=False):
        row = cmp.scores[layer]
        counts, edges, source = _histogram(row, (held_out or {}).get(layer))
        ax.stairs(counts.clamp(min=0.5).numpy(), edges.numpy(), fill=True, color="0.6", baseline=0.5)
        ax.set_yscale("log")
        for i, (kind, s) in enumerate(row.items()):
            color = _COLORS[i % len(_COLORS)]
            style = ":" if s.scale.dim() > 0 else "--"
            ax.axvline(
                s.lo, color=color, linestyle=style, linewidth=1.2, label=f"{kind} ({s.sqnr_db:.1f} dB)"
            )
            ax.axvline(s.hi, color=color, linestyle=style, linewidth=1.2)
        ax.set_title(f"{layer or '(model)'}  [{source}]", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(
        f"input activations and clipping ranges, {dtype_name(cmp.dtype)} {cmp.qscheme} "
        "(dotted: per-channel outermost)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
