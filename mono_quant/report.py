"""Compare observers layer by layer: calibrate, score, print, save, plot (``mono-quant calibrate``).

One calibration pass feeds every observer kind at once (a forward pre-hook per layer calls each observer in
turn and times it), so the model runs once per batch whatever the number of observers. Each observer's
qparams are then scored by the SQNR of that layer's input on a held-out batch, fake-quantized with them.

Observer kinds (``OBSERVER_KINDS``; the names the command takes):

    minmax          MinMaxObserver
    moving_average  MovingAverageMinMaxObserver(averaging_constant=0.01)
    kl              HistogramObserver(method="kl", bins=2048)
    mse             HistogramObserver(method="mse", bins=2048)
    percentile      HistogramObserver(method="percentile", percentile=99.99, bins=2048)
    per_channel     PerChannelMinMaxObserver(ch_axis=-1 for Linear inputs, 1 for Conv inputs)

Saved files:

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
  ``mono_quant.distributed.merge_observers([run_a["kl"], run_b["kl"]])``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mono_quant.calibration.runner import call_model, create_observer, layer_input, move_batch
from mono_quant.core.observers import HistogramObserver, ObserverBase
from mono_quant.core.qparams import quant_range, quantization_sqnr

__all__ = [
    "DTYPES",
    "OBSERVER_KINDS",
    "Comparison",
    "Score",
    "calibrate_observers",
    "capture_inputs",
    "compare_observers",
    "format_summary",
    "format_table",
    "load_qparams",
    "load_state",
    "make_observer",
    "observer_kwargs",
    "plot_comparison",
    "save_qparams",
    "save_state",
    "score_observers",
    "target_layers",
    "winner_line",
]

# kind -> (create_observer name, keywords); per_channel gets its ch_axis from the layer type
OBSERVER_KINDS: dict[str, tuple[str, dict]] = {
    "minmax": ("minmax", {}),
    "moving_average": ("moving_average", {"averaging_constant": 0.01}),
    "kl": ("histogram", {"method": "kl", "bins": 2048}),
    "mse": ("histogram", {"method": "mse", "bins": 2048}),
    "percentile": ("histogram", {"method": "percentile", "percentile": 99.99, "bins": 2048}),
    "per_channel": ("per_channel_minmax", {}),
}

DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int4": torch.int4,
    "uint4": torch.uint4,
}
_DTYPE_NAMES = {torch.qint8: "int8", torch.quint8: "uint8", **{v: k for k, v in DTYPES.items()}}

CALIBRATED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_STATE_FORMAT = "mono_quant.observer_state"
_QPARAMS_FORMAT = "mono_quant.qparams"


def _version() -> str:
    from mono_quant import __version__

    return __version__


# --- observers -------------------------------------------------------------------------------------------


def _channel_axis(module: nn.Module | None) -> int:
    """The channel axis of a layer's input: 1 for ``(N, C, ...)`` conv inputs, -1 for ``(..., C)``."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d)) else -1


def make_observer(
    kind: str, dtype: torch.dtype, qscheme: str, module: nn.Module | None = None
) -> ObserverBase:
    """A fresh observer of ``kind`` (a key of ``OBSERVER_KINDS``) for the input of ``module``.

    Raises:
        ValueError: ``kind`` is not a key of ``OBSERVER_KINDS``.
    """
    if kind not in OBSERVER_KINDS:
        raise ValueError(f"unknown observer {kind!r}; choose from {', '.join(OBSERVER_KINDS)}")
    name, kwargs = OBSERVER_KINDS[kind]
    kwargs = dict(kwargs)
    if kind == "per_channel":
        kwargs["ch_axis"] = _channel_axis(module)
    return create_observer(name, dtype=dtype, qscheme=qscheme, **kwargs)


def observer_kwargs(obs: ObserverBase) -> dict:
    """The constructor keywords that rebuild ``obs`` (``dtype`` as a name such as ``"int8"``): JSON-safe."""
    kwargs = {
        "dtype": _DTYPE_NAMES.get(obs.dtype, str(obs.dtype)),
        "qscheme": obs.qscheme,
        "reduce_range": obs.reduce_range,
        "eps": obs.eps,
    }
    if obs.averaging_constant is not None:
        kwargs["averaging_constant"] = obs.averaging_constant
    if obs.ch_axis is not None:
        kwargs["ch_axis"] = obs.ch_axis
    if isinstance(obs, HistogramObserver):
        kwargs.update(bins=obs.bins, method=obs.method)
        if obs.method == "percentile":
            kwargs["percentile"] = obs.percentile
    return kwargs


def _rebuild(class_name: str, kwargs: dict) -> ObserverBase:
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str):
        if kwargs["dtype"] not in DTYPES:
            raise ValueError(f"saved dtype {kwargs['dtype']!r} is not one of {', '.join(DTYPES)}")
        kwargs["dtype"] = DTYPES[kwargs["dtype"]]
    return create_observer(class_name, **kwargs)


# --- calibration -----------------------------------------------------------------------------------------


def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` of ``model``, in model order.

    Raises:
        ValueError: the model has none.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CALIBRATED_MODULES) and name}
    if not layers and isinstance(model, CALIBRATED_MODULES):
        layers = {"": model}
    if not layers:
        kinds = ", ".join(t.__name__ for t in CALIBRATED_MODULES)
        raise ValueError(f"the model has no {kinds} layer to calibrate")
    return layers


def _run(model: nn.Module, batches: Iterable, device, hook_factory: Callable[[str], Callable]) -> int:
    """Run ``batches`` through ``model`` (eval, no_grad) with a forward pre-hook on every target layer."""
    handles = [
        m.register_forward_pre_hook(hook_factory(name), with_kwargs=True)
        for name, m in target_layers(model).items()
    ]
    was_training = model.training
    n = 0
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    call_model(model, move_batch(batch, device))
                except Exception as e:  # the user's model and data: say which batch
                    raise RuntimeError(f"the model failed on batch {i}: {type(e).__name__}: {e}") from e
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return n


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
        kinds: keys of ``OBSERVER_KINDS``. dtype, qscheme: as for the observers.
        progress: a tqdm bar over the batches, on stderr.

    Returns:
        ``(observers, seconds)``: ``{layer: {kind: observer}}`` and ``{layer: {kind: time spent observing}}``.

    Raises:
        RuntimeError: the model raised on a batch (the message names the batch).
    """
    layers = target_layers(model)
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

    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrating", unit="batch", file=sys.stderr, leave=False)
    try:
        _run(model, iterator, device, hook_factory)
    finally:
        if progress:
            iterator.close()
    return observers, seconds


def capture_inputs(model: nn.Module, batch, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every target layer's input activation on ``batch``: ``{layer: tensor}`` (the last call, if several)."""
    captured: dict[str, torch.Tensor] = {}

    def hook_factory(name: str):
        def hook(_module, args, kwargs):
            x = layer_input(args, kwargs)
            if x is not None:
                captured[name] = x.detach().clone()

        return hook

    _run(model, [batch], device, hook_factory)
    return captured


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
    kinds: Sequence[str] = tuple(OBSERVER_KINDS),
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
        kinds: keys of ``OBSERVER_KINDS``. dtype: ``torch.int8`` / ``uint8`` / ``int4`` / ``uint4``.
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


# --- files -----------------------------------------------------------------------------------------------


def _jsonable(t: torch.Tensor, cast):
    return cast(t) if t.dim() == 0 else [cast(v) for v in t.tolist()]


def _json_float(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def save_qparams(cmp: Comparison, path: str, model: str = "") -> None:
    """Write every layer's qparams, per observer, as JSON (layout in the module docstring)."""
    qmin, qmax = quant_range(cmp.dtype)
    out = {
        "format": _QPARAMS_FORMAT,
        "version": 1,
        "mono_quant_version": _version(),
        "model": model,
        "dtype": _DTYPE_NAMES.get(cmp.dtype, str(cmp.dtype)),
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
    if data.get("format") != _QPARAMS_FORMAT:
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
        observers: ``{layer: {kind: observer}}`` as ``calibrate_observers`` returns.
    """
    by_kind: dict[str, dict] = {}
    for layer, row in observers.items():
        for kind, obs in row.items():
            entry = by_kind.setdefault(kind, {"class": type(obs).__name__, "layers": {}})
            if entry["class"] != type(obs).__name__:
                raise ValueError(f"observer kind {kind!r} mixes {entry['class']} and {type(obs).__name__}")
            sd = {k: v.detach().cpu() for k, v in obs.state_dict().items()}
            entry["layers"][layer] = {"kwargs": observer_kwargs(obs), "state_dict": sd}
    state = {
        "format": _STATE_FORMAT,
        "version": 1,
        "mono_quant_version": _version(),
        "observers": by_kind,
    }
    torch.save(state, path)


def load_state(path: str, map_location="cpu") -> dict[str, dict[str, ObserverBase]]:
    """Fresh observers holding the state saved by ``save_state``: ``{kind: {layer: observer}}``.

    Each observer is rebuilt from its saved class and keywords (a per-channel observer keeps its layer's
    ``ch_axis``), then loads its ``state_dict``.

    Raises:
        ValueError: the file is not a ``save_state`` file.
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not a mono_quant observer state file (written by --save-state)")
    out: dict[str, dict[str, ObserverBase]] = {}
    for kind, entry in state["observers"].items():
        out[kind] = {}
        for layer, saved in entry["layers"].items():
            obs = _rebuild(entry["class"], saved["kwargs"])
            obs.load_state_dict(saved["state_dict"])
            out[kind][layer] = obs
    return out


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
        f"input activations and clipping ranges, {_DTYPE_NAMES.get(cmp.dtype, cmp.dtype)} {cmp.qscheme} "
        "(dotted: per-channel outermost)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
