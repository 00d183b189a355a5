"""The plot of a comparison (``mono-quant calibrate --plot``): per layer, the activation histogram and each
observer's clipping range.

matplotlib is imported only when a figure is made (``import mono_quant`` works without it); the figure is a
``matplotlib.figure.Figure`` of its own, so no pyplot state or backend of the caller changes.
"""

from __future__ import annotations

import io
import math
import os

import torch

from mono_quant.compare import Comparison, Score, format_db
from mono_quant.core.observers import HistogramObserver
from mono_quant.core.qparams import dtype_name
from mono_quant.core.registry import observer_name

__all__ = [
    "OBSERVER_COLORS",
    "comparison_figure",
    "observer_color",
    "plot_comparison",
    "plot_format",
    "plot_formats",
]

# One colour per registry name, whatever the order of --observer (a test checks every name has one)
OBSERVER_COLORS = {
    "minmax": "tab:red",
    "moving_average": "tab:orange",
    "histogram": "tab:olive",
    "kl": "tab:green",
    "mse": "tab:blue",
    "percentile": "tab:purple",
    "per_channel": "tab:brown",
    "moving_average_per_channel": "tab:pink",
    "amax_history": "tab:cyan",
    "per_block": "black",
}


def observer_color(kind: str) -> str:
    """The plot colour of an observer name (any registry name, alias or class name; gray otherwise)."""
    try:
        return OBSERVER_COLORS.get(observer_name(kind), "tab:gray")
    except ValueError:
        return "tab:gray"


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
    x = torch.empty(0) if held_out is None else held_out.detach().float().flatten().cpu()
    x = x[torch.isfinite(x)]
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
    if lo == hi:
        hi = lo + 1.0
    counts = torch.histc(x, bins=256, min=lo, max=hi)
    return counts, torch.linspace(lo, hi, 257), "held-out batch"


def plot_format(path: str) -> str:
    """The image format ``plot_comparison`` writes to ``path``: its extension, ``png`` without one."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext or "png"


def plot_formats() -> list[str]:
    """The image formats matplotlib writes here (``png``, ``pdf``, ``svg``, ...).

    Raises:
        NotImplementedError: matplotlib is not installed.
    """
    return sorted(_figure_class()().canvas.get_supported_filetypes())


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise NotImplementedError(
            "--plot needs matplotlib, which is not installed: pip install 'mono_quant[plot]'"
        ) from None
    return Figure


def _short(name: str, limit: int) -> str:
    """``name``, its start cut to ``...`` past ``limit`` characters (the end of a layer path says most)."""
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


# figure geometry, inches: panel size, the band on top for the title and the legend, gaps
_PANEL_W, _PANEL_H, _HEADER_H, _GAP_H, _GAP_W, _MARGIN = 4.6, 2.5, 1.25, 0.75, 0.55, 0.45


def comparison_figure(cmp: Comparison, held_out: dict[str, torch.Tensor] | None = None):
    """The figure of ``plot_comparison`` (a ``matplotlib.figure.Figure``, no pyplot state touched).

    One panel per layer, up to 3 (4 past 12 layers) in a row: the activation histogram (log counts) and each
    observer's clipping range (dashed; dotted per channel: the outermost), its title the layer name and the
    best observer. The figure grows with the layers; the title and one legend for all panels sit in a band
    above them; each observer has its colour of ``OBSERVER_COLORS`` whatever the order.

    Raises:
        NotImplementedError: matplotlib is not installed (``pip install 'mono_quant[plot]'``).
    """
    figure = _figure_class()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

    layers = list(cmp.scores)
    cols = min(3 if len(layers) <= 12 else 4, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / cols))
    width = 2 * _MARGIN + cols * _PANEL_W + (cols - 1) * _GAP_W
    height = _HEADER_H + rows * _PANEL_H + (rows - 1) * _GAP_H + _MARGIN
    fig = figure(figsize=(width, height))
    fig.subplots_adjust(
        left=_MARGIN / width,
        right=1 - _MARGIN / width,
        top=1 - _HEADER_H / height,
        bottom=_MARGIN / height,
        wspace=_GAP_W / _PANEL_W,
        hspace=_GAP_H / _PANEL_H,
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    sources = set()
    kinds: dict[str, bool] = {}  # kind -> per channel, in first-seen order
    for ax, layer in zip(axes.flat, layers, strict=False):
        row = cmp.scores[layer]
        counts, edges, source = _histogram(row, (held_out or {}).get(layer))
        sources.add(source)
        ax.stairs(counts.clamp(min=0.5).numpy(), edges.numpy(), fill=True, color="0.6", baseline=0.5)
        ax.set_yscale("log")
        # few ticks: dozens of panels with matplotlib's default log ticks take most of the drawing time
        ax.yaxis.set_major_locator(LogLocator(numticks=4))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(5))
        for kind, s in row.items():
            per_channel = s.scale.dim() > 0
            kinds.setdefault(kind, per_channel)
            style = dict(color=observer_color(kind), linestyle=":" if per_channel else "--", linewidth=1.2)
            ax.axvline(s.lo, **style, gid=f"range:{kind}")
            ax.axvline(s.hi, **style, gid=f"range:{kind}")
        best = cmp.best(layer)
        score = f"best: {best} {format_db(row[best].sqnr_db, 0)} dB" if best else "SQNR n/a"
        ax.set_title(f"{_short(layer or '(model)', 56)}\n{score}", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [
        Line2D([], [], color=observer_color(k), linestyle=":" if pc else "--", linewidth=1.5, label=k)
        for k, pc in kinds.items()
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.42 / height),
        ncol=min(len(handles), 8) or 1,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"input activations and clipping ranges, {dtype_name(cmp.dtype)} {cmp.qscheme} "
        f"(histograms of the {' / '.join(sorted(sources))}; dotted: per-channel outermost)",
        fontsize=10,
        y=1 - 0.12 / height,
        va="top",
    )
    return fig


def plot_comparison(cmp: Comparison, path: str, held_out: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``comparison_figure`` to ``path``, in the format of its extension (``plot_format``).

    Raises:
        NotImplementedError: matplotlib is not installed (``pip install 'mono_quant[plot]'``).
        ValueError: matplotlib cannot write that format.
        OSError: the file cannot be written (an existing one is then unchanged: ``files.write_file``).
    """
    from mono_quant.files import write_file

    fig = comparison_figure(cmp, held_out)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=plot_format(path), dpi=90)
    write_file(path, buffer.getvalue())
