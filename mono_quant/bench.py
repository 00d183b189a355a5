"""``mono-quant bench``: a short benchmark of the observers on this machine, printed as a markdown table.

It times mono_quant's observers (torch path everywhere; Triton path on CUDA when the kernels import)
and ``torch.ao.quantization``'s observers (when importable) on the same tensors in the same run, next to
the read ceiling of each tensor (``x.sum()``, measured in the same run): median time, throughput in
elements/s and GB/s (bytes of the input read once), and the fraction of the ceiling. It also times the
histogram observer's ``calculate_qparams`` (the threshold search) against torch.ao's.

Each measurement takes at least ``--rounds`` calls and at least ``--min-time`` seconds of them, and keeps
the spread of the calls: a row whose median beats the read ceiling by more than ``CEILING_MARGIN``, or
whose calls spread too widely (``SPREAD_LIMIT``), or whose ceiling did, is flagged in the ``notes``
column as not credible (another process took the CPU or the GPU meanwhile): rerun it on an idle machine.

The helpers here (timing, test tensors, observer construction, peak memory) are shared with the full
suite in ``benchmarks/`` of the source tree, which adds more sizes, the per-candidate loop baseline of the
threshold search, the 200-observer case and JSON output (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mono_quant.args import CLIError, Parser, observer_choices, observer_kind
from mono_quant.core.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from mono_quant.core.registry import OBSERVERS
from mono_quant.ops import triton_available
from mono_quant.timing import (
    Timing,
    ceiling_timing,
    time_calls,
)

__all__ = [
    "CEILING_MARGIN",
    "HIDDEN",
    "KINDS",
    "SPREAD_LIMIT",
    "Row",
    "activation",
    "main",
    "mono_observer",
    "torch_ao",
    "torch_ao_observer",
    "triton_skip_reason",
]

HIDDEN = 1000  # columns of the [tokens, hidden] test tensors (the channel axis of per-channel observers)

# A median this much faster than the read ceiling of the same tensor cannot be right (x.sum() reads each byte
# once, as every observer must): something else ran meanwhile.
CEILING_MARGIN = 1.2
# A spread of the calls (interquartile range over the median) above this makes the median a guess.
SPREAD_LIMIT = 0.5

# The default kinds, one per distinct forward: kind -> (mono_quant class, torch.ao class name, keyword
# arguments shared by both). ``--kinds`` takes every registry name: kl / mse / percentile time the histogram's
# forward with that method (the method matters only to calculate_qparams).
KINDS: dict[str, tuple[type[ObserverBase], str, dict]] = {
    "minmax": (MinMaxObserver, "MinMaxObserver", {}),
    "moving_average": (
        MovingAverageMinMaxObserver,
        "MovingAverageMinMaxObserver",
        {"averaging_constant": 0.01},
    ),
    "histogram": (HistogramObserver, "HistogramObserver", {"bins": 2048}),
    "per_channel": (PerChannelMinMaxObserver, "PerChannelMinMaxObserver", {"ch_axis": 1}),
    "moving_average_per_channel": (
        MovingAveragePerChannelMinMaxObserver,
        "MovingAveragePerChannelMinMaxObserver",
        {"averaging_constant": 0.01, "ch_axis": 1},
    ),
}


# --- inputs and observers --------------------------------------------------------------------------------
def activation(
    numel: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    hidden: int = HIDDEN,
) -> torch.Tensor:
    """An LLM-like activation ``[tokens, hidden]`` with about ``numel`` elements (at least one row).

    Gaussian values, a few outlier channels twenty times wider (as LLM activations have), and a sprinkle
    of large single values, so that the range, the histogram's tails and the per-channel ranges all differ.
    Made on the CPU from ``seed`` (the same values on every device), then moved.
    """
    tokens = max(1, round(numel / hidden))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    x[:, :: max(1, hidden // 8)] *= 20.0  # outlier channels
    spikes = torch.randint(0, x.numel(), (max(1, x.numel() // 100_000),), generator=gen)
    x.view(-1)[spikes] *= 50.0
    return x.to(device=device, dtype=dtype)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.ao.quantization is deprecated; its warnings say so, and are not what a benchmark measures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def torch_ao():
    """``torch.ao.quantization``, imported lazily, deprecation warnings silenced; ``None`` if absent."""
    with _quiet():
        try:
            import torch.ao.quantization as ao
        except ImportError:
            return None
    return ao


def torch_ao_observer(kind: str, **overrides) -> torch.nn.Module | None:
    """torch.ao's observer of ``kind`` (a registry name), ``None`` where torch.ao is not importable or has
    no counterpart.

    Raises:
        ValueError: unknown ``kind``.
    """
    _, _, ao_name, kwargs = _kind(kind)
    ao = torch_ao()
    if ao is None or ao_name is None:
        return None
    with _quiet():
        return getattr(ao, ao_name)(**{**kwargs, **overrides})


def mono_observer(kind: str, backend: str = "torch", **overrides) -> ObserverBase:
    """mono_quant's observer of ``kind`` (a registry name, e.g. one of ``KINDS``) on ``backend``.

    Raises:
        ValueError: unknown ``kind``.
    """
    cls, preset, _, kwargs = _kind(kind)
    return cls(backend=backend, **{**kwargs, **preset, **overrides})


def _kind(kind: str) -> tuple[type[ObserverBase], dict, str | None, dict]:
    """``(class, the name's preset keywords, torch.ao class name or None, keywords shared with torch.ao)``."""
    cls, preset = OBSERVERS[observer_kind(kind)]
    for mono_cls, ao_name, kwargs in KINDS.values():
        if mono_cls is cls:
            return cls, preset, ao_name, kwargs
    return cls, preset, None, {}  # no torch.ao counterpart (amax_history): timed without a baseline


def triton_skip_reason(device: torch.device | str) -> str | None:
    """Why the Triton path cannot be timed on ``device`` (``None`` when it can)."""
    if torch.device(device).type != "cuda":
        return "the Triton kernels run on CUDA tensors; this device is not CUDA"
    if not triton_available():
        return "triton or mono_quant.kernels is not importable"
    return None


# --- the short run behind `mono-quant bench` ----------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a case, its timing and what it is compared with.

    ``spread`` / ``ceiling_spread``: interquartile range over the median of this row's calls and of the
    ceiling's (``Timing.spread``). ``notes``: what makes the row not credible (``flags``), plus any other.
    """

    case: str
    impl: str
    dtype: str
    numel: int
    seconds: float
    bytes: int = 0
    ceiling_s: float | None = None
    baseline_s: float | None = None
    notes: list[str] = field(default_factory=list)
    spread: float = 0.0
    ceiling_spread: float = 0.0
    calls: int = 0

    def flags(self) -> list[str]:
        """Why this row's numbers cannot be trusted (empty when they can)."""
        out = []
        if self.ceiling_s and self.bytes and self.seconds * CEILING_MARGIN < self.ceiling_s:
            out.append(
                f"NOT CREDIBLE: {self.ceiling_s / self.seconds:.0%} of the read ceiling (a pass that reads x "
                "cannot beat x.sum() by that much)"
            )
        if self.spread > SPREAD_LIMIT:
            out.append(f"NOT CREDIBLE: calls spread {self.spread:.0%} of the median")
        if self.ceiling_s and self.ceiling_spread > SPREAD_LIMIT:
            out.append(f"NOT CREDIBLE: the ceiling's calls spread {self.ceiling_spread:.0%} of its median")
        return out

    def cells(self) -> list[str]:
        gbs = f"{self.bytes / self.seconds / 1e9:.2f}" if self.bytes else ""
        eps = f"{self.numel / self.seconds / 1e9:.3f}" if self.bytes else ""
        frac = f"{self.ceiling_s / self.seconds:.0%}" if self.ceiling_s and self.bytes else ""
        speedup = f"{self.baseline_s / self.seconds:.2f}x" if self.baseline_s else ""
        return [
            self.case,
            self.impl,
            self.dtype,
            f"{self.numel:.0e}",
            f"{self.seconds * 1e3:.3f}",
            eps,
            gbs,
            frac,
            speedup,
            str(self.calls) if self.calls else "",
            "; ".join(self.flags() + self.notes),
        ]


HEADER = [
    "case",
    "impl",
    "dtype",
    "elements",
    "median ms",
    "Gelem/s",
    "GB/s",
    "of ceiling",
    "vs torch.ao",
    "calls",
    "notes",
]


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table (``vs torch.ao``: torch.ao's time over this one, >1 is faster)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()).rstrip() + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class _Budget:
    """How much each measurement takes: at least ``rounds`` calls and ``min_seconds`` of them."""

    rounds: int
    min_seconds: float

    def time(self, fn: Callable[[], object], device) -> Timing:
        return time_calls(fn, device, rounds=self.rounds, min_seconds=self.min_seconds)


def _forward_cases(
    kinds: list[str], sizes: list[int], dtypes: list[torch.dtype], device: torch.device, budget: _Budget
) -> Iterator[tuple[str, Callable[[], list[Row]]]]:
    triton_reason = triton_skip_reason(device)
    for numel in sizes:
        for dtype in dtypes:
            for kind in kinds:

                def run(kind=kind, numel=numel, dtype=dtype) -> list[Row]:
                    x = activation(numel, dtype, device)
                    ceiling = ceiling_timing(x, "sum", rounds=budget.rounds, min_seconds=budget.min_seconds)
                    name = str(dtype).removeprefix("torch.")
                    impls = [("mono_quant torch", mono_observer(kind, "torch").to(device))]
                    if triton_reason is None:
                        impls.append(("mono_quant triton", mono_observer(kind, "triton").to(device)))
                    ao_obs = torch_ao_observer(kind)
                    ao = None
                    if ao_obs is not None:
                        ao_obs = ao_obs.to(device)
                        ao = budget.time(lambda: ao_obs(x), device)
                    common = dict(ceiling_s=ceiling.median, ceiling_spread=ceiling.spread)
                    rows = []
                    for impl, obs in impls:
                        t = budget.time(lambda obs=obs: obs(x), device)
                        base = ao.median if ao else None
                        rows.append(
                            Row(kind, impl, name, x.numel(), t.median, x.nbytes, baseline_s=base,
                                spread=t.spread, calls=t.calls, **common)
                        )  # fmt: skip
                    if ao is not None:
                        rows.append(
                            Row(kind, "torch.ao", name, x.numel(), ao.median, x.nbytes, spread=ao.spread,
                                calls=ao.calls, **common)
                        )  # fmt: skip
                    return rows

                yield f"{kind} {numel:.0e} {dtype}", run


def _search_cases(device: torch.device, budget: _Budget) -> Iterator[tuple[str, Callable[[], list[Row]]]]:
    x = activation(1_000_000, torch.float32, device)
    for bins in (2048, 8192):

        def run(bins=bins) -> list[Row]:
            ao_obs = torch_ao_observer("histogram", bins=bins)
            ao = None
            rows = []
            case = f"calculate_qparams {bins} bins"
            if ao_obs is not None:
                ao_obs = ao_obs.to(device)
                ao_obs(x)
                ao = budget.time(ao_obs.calculate_qparams, device)
            for method in ("kl", "mse", "percentile"):
                for qscheme in ("symmetric", "affine"):
                    obs = mono_observer("histogram", "torch", bins=bins, method=method, qscheme=qscheme)
                    obs = obs.to(device)
                    obs(x)
                    t = budget.time(obs.calculate_qparams, device)
                    base = ao.median if ao else None
                    impl = f"mono_quant {method} {qscheme}"
                    rows.append(
                        Row(case, impl, "float32", x.numel(), t.median, baseline_s=base, spread=t.spread,
                            calls=t.calls)
                    )  # fmt: skip
            if ao is not None:
                rows.append(
                    Row(case, "torch.ao (affine)", "float32", x.numel(), ao.median, spread=ao.spread,
                        calls=ao.calls)
                )  # fmt: skip
            return rows

        yield f"calculate_qparams {bins} bins", run


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="mono-quant bench",
        description="Time mono_quant's observers against torch.ao's here and print a markdown table.",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated element counts, e.g. 1e5,1e6 (default: 1e5,1e6,1e7 on CPU; 1e6,1e8 on CUDA)",
    )
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated observer names (default: {','.join(KINDS)}); names: {observer_choices()}",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="at least this many timed calls per measurement (default 5)"
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="and at least this many seconds of calls per measurement (default 0.2); the median is reported",
    )
    parser.add_argument("--no-search", action="store_true", help="skip the calculate_qparams timings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _parse_list(text: str, what: str, convert: Callable[[str], object]) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [convert(item) for item in items]
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"bad {what} {text!r}: {exc}") from None


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name!r} is not float32, bfloat16 or float16")
    return dtype


def _size(text: str) -> int:
    value = float(text)
    if not 1 <= value <= 1e12:
        raise ValueError(f"{text!r} is not an element count between 1 and 1e12")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    """Run the short benchmark and print its markdown table on stdout; returns the exit status.

    Args:
        argv: command-line arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for bad arguments.
    """
    try:
        args = _parse(argv)
    except CLIError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default_sizes = "1e6,1e8" if device.type == "cuda" else "1e5,1e6,1e7"
        sizes = _parse_list(args.sizes or default_sizes, "--sizes", _size)
        dtypes = _parse_list(args.dtypes, "--dtypes", _dtype)
        kinds = _parse_list(args.kinds, "--kinds", observer_kind)
        for kind in kinds:
            _kind(kind)
        if args.rounds < 1:
            raise ValueError(f"--rounds {args.rounds} must be at least 1")
        if not 0 <= args.min_time <= 60:
            raise ValueError(f"--min-time {args.min_time} must be from 0 to 60 seconds")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but CUDA is not available")
    except (ValueError, RuntimeError) as exc:
        print(f"mono-quant bench: {exc}", file=sys.stderr)
        return 2

    budget = _Budget(args.rounds, args.min_time)
    cases = list(_forward_cases(kinds, sizes, dtypes, device, budget))
    if not args.no_search:
        cases += list(_search_cases(device, budget))
    from tqdm.auto import tqdm

    show = not args.quiet and sys.stderr.isatty()
    rows: list[Row] = []
    with (
        _quiet(),
        tqdm(cases, desc="mono-quant bench", unit="case", disable=not show, file=sys.stderr) as bar,
    ):
        for label, run in bar:
            bar.set_postfix_str(label)
            rows += run()

    where = f"{device}" if device.type != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"mono_quant bench on {where}, torch {torch.__version__}; median of at least {args.rounds} calls and "
        f"{args.min_time:g} s per measurement (calls: how many)."
    )
    print("GB/s: input bytes read once. of ceiling: time of x.sum() on the same tensor / this time.")
    print("vs torch.ao: torch.ao's median / this median (>1: mono_quant is faster).")
    print(
        f"notes: NOT CREDIBLE where a row beats the read ceiling by more than {CEILING_MARGIN - 1:.0%} or "
        f"its calls (or the ceiling's) spread more than {SPREAD_LIMIT:.0%} of the median: rerun on an idle "
        "machine.\n"
    )
    print(markdown_table(rows))
    doubtful = sum(bool(row.flags()) for row in rows)
    if doubtful:
        print(f"\n{doubtful} of {len(rows)} rows are not credible (see notes): the machine was busy.")
    if torch_ao() is None:
        print("\ntorch.ao.quantization is not importable here: no baseline column.")
    reason = triton_skip_reason(device)
    if reason:
        print(f"\nTriton path not timed: {reason}.")
    return 0
