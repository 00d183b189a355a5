"""``mono-quant bench``: a short benchmark of the observers on this machine, printed as a markdown table.

It times mono_quant's observers (torch path everywhere; Triton path on CUDA when the kernels import)
and ``torch.ao.quantization``'s observers (when importable) on the same tensors in the same run, next to
the read ceiling of each tensor (``x.sum()``, measured in the same run): median time, throughput in
elements/s and GB/s (bytes of the input read once), and the fraction of the ceiling. It also times the
histogram observer's ``calculate_qparams`` (the threshold search) against torch.ao's.

The helpers here (timing, test tensors, observer construction, peak memory) are shared with the full
suite in ``benchmarks/`` of the source tree, which adds more sizes, the per-candidate loop baseline of the
threshold search, the 200-observer case and JSON output (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mono_quant.args import CLIError, Parser
from mono_quant.core.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from mono_quant.ops import triton_available

__all__ = [
    "HIDDEN",
    "KINDS",
    "Row",
    "activation",
    "ceiling_seconds",
    "main",
    "median_seconds",
    "mono_observer",
    "peak_extra_bytes",
    "synchronize",
    "torch_ao",
    "torch_ao_observer",
    "triton_skip_reason",
]

HIDDEN = 1000  # columns of the [tokens, hidden] test tensors (the channel axis of per-channel observers)

# kind -> (mono_quant class, torch.ao class name, keyword arguments shared by both)
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


# --- timing ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that host timers see all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], device: torch.device | str = "cpu", *, rounds: int = 7, warmup: int = 1
) -> float:
    """Median wall time of ``fn()`` over ``rounds`` calls after ``warmup`` calls, synchronizing the device.

    Raises:
        ValueError: ``rounds < 1``.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceiling_seconds(x: torch.Tensor, op: str = "sum", *, rounds: int = 7) -> float:
    """Median time of the plain pass over ``x`` that bounds an observer: ``"sum"`` (one read) or ``"clone"``.

    Raises:
        ValueError: unknown ``op``.
    """
    if op == "sum":
        return median_seconds(x.sum, x.device, rounds=rounds)
    if op == "clone":
        return median_seconds(x.clone, x.device, rounds=rounds)
    raise ValueError(f"op={op!r} is not 'sum' or 'clone'")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak memory ``fn()`` allocates on top of what is already allocated, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` around the call (exact). CPU: torch's allocator keeps no
    statistics, so the allocation events of ``torch.profiler`` are replayed: each op's allocations count
    from its start, its frees from its end (an upper bound within an op). ``None`` where neither works.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        delta = event.self_cpu_memory_usage
        if delta > 0:
            changes.append((event.time_range.start, delta))
        elif delta < 0:
            changes.append((event.time_range.end, delta))
    current = peak = 0
    for _, delta in sorted(changes, key=lambda change: change[0]):
        current += delta
        peak = max(peak, current)
    return peak


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
    """torch.ao's observer of ``kind`` (one of ``KINDS``), ``None`` where torch.ao is not importable.

    Raises:
        ValueError: unknown ``kind``.
    """
    _, ao_name, kwargs = _kind(kind)
    ao = torch_ao()
    if ao is None:
        return None
    with _quiet():
        return getattr(ao, ao_name)(**{**kwargs, **overrides})


def mono_observer(kind: str, backend: str = "torch", **overrides) -> ObserverBase:
    """mono_quant's observer of ``kind`` (one of ``KINDS``) on ``backend``.

    Raises:
        ValueError: unknown ``kind``.
    """
    cls, _, kwargs = _kind(kind)
    return cls(backend=backend, **{**kwargs, **overrides})


def _kind(kind: str) -> tuple[type[ObserverBase], str, dict]:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(map(repr, KINDS))}")
    return KINDS[kind]


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
    """One line of the table: a case, its median time and what it is compared with."""

    case: str
    impl: str
    dtype: str
    numel: int
    seconds: float
    bytes: int = 0
    ceiling_s: float | None = None
    baseline_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        gbs = f"{self.bytes / self.seconds / 1e9:.2f}" if self.bytes else ""
        eps = f"{self.numel / self.seconds / 1e9:.3f}" if self.bytes else ""
        frac = f"{self.ceiling_s / self.seconds:.0%}" if self.ceiling_s else ""
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
        ]


HEADER = ["case", "impl", "dtype", "elements", "median ms", "Gelem/s", "GB/s", "of ceiling", "vs torch.ao"]


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table (``vs torch.ao``: torch.ao's time over this one, >1 is faster)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def _forward_cases(
    kinds: list[str], sizes: list[int], dtypes: list[torch.dtype], device: torch.device, rounds: int
) -> Iterator[tuple[str, Callable[[], list[Row]]]]:
    triton_reason = triton_skip_reason(device)
    for numel in sizes:
        for dtype in dtypes:
            for kind in kinds:

                def run(kind=kind, numel=numel, dtype=dtype) -> list[Row]:
                    x = activation(numel, dtype, device)
                    ceiling = ceiling_seconds(x, rounds=rounds)
                    name = str(dtype).removeprefix("torch.")
                    impls = [("mono_quant torch", mono_observer(kind, "torch").to(device))]
                    if triton_reason is None:
                        impls.append(("mono_quant triton", mono_observer(kind, "triton").to(device)))
                    ao_obs = torch_ao_observer(kind)
                    ao_s = None
                    if ao_obs is not None:
                        ao_obs = ao_obs.to(device)
                        ao_s = median_seconds(lambda: ao_obs(x), device, rounds=rounds)
                    rows = []
                    for impl, obs in impls:
                        t = median_seconds(lambda obs=obs: obs(x), device, rounds=rounds)
                        rows.append(Row(kind, impl, name, x.numel(), t, x.nbytes, ceiling, ao_s))
                    if ao_s is not None:
                        rows.append(Row(kind, "torch.ao", name, x.numel(), ao_s, x.nbytes, ceiling))
                    return rows

                yield f"{kind} {numel:.0e} {dtype}", run


def _search_cases(device: torch.device, rounds: int) -> Iterator[tuple[str, Callable[[], list[Row]]]]:
    x = activation(1_000_000, torch.float32, device)
    for bins in (2048, 8192):

        def run(bins=bins) -> list[Row]:
            ao_obs = torch_ao_observer("histogram", bins=bins)
            ao_s = None
            rows = []
            if ao_obs is not None:
                ao_obs = ao_obs.to(device)
                ao_obs(x)
                ao_s = median_seconds(ao_obs.calculate_qparams, device, rounds=rounds)
            for method in ("kl", "mse", "percentile"):
                for qscheme in ("symmetric", "affine"):
                    obs = mono_observer("histogram", "torch", bins=bins, method=method, qscheme=qscheme)
                    obs = obs.to(device)
                    obs(x)
                    t = median_seconds(obs.calculate_qparams, device, rounds=rounds)
                    case = f"calculate_qparams {bins} bins"
                    rows.append(
                        Row(case, f"mono_quant {method} {qscheme}", "float32", x.numel(), t, baseline_s=ao_s)
                    )
            if ao_s is not None:
                rows.append(
                    Row(f"calculate_qparams {bins} bins", "torch.ao (affine)", "float32", x.numel(), ao_s)
                )
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
        "--kinds", default=",".join(KINDS), help=f"comma-separated observer kinds from: {', '.join(KINDS)}"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per case; the median is reported")
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
        kinds = _parse_list(args.kinds, "--kinds", lambda k: _kind(k) and k)
        if args.rounds < 1:
            raise ValueError(f"--rounds {args.rounds} must be at least 1")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but CUDA is not available")
    except (ValueError, RuntimeError) as exc:
        print(f"mono-quant bench: {exc}", file=sys.stderr)
        return 2

    cases = list(_forward_cases(kinds, sizes, dtypes, device, args.rounds))
    if not args.no_search:
        cases += list(_search_cases(device, args.rounds))
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
    print(f"mono_quant bench on {where}, torch {torch.__version__}; median of {args.rounds} calls.")
    print("GB/s: input bytes read once. of ceiling: time of x.sum() on the same tensor / this time.")
    print("vs torch.ao: torch.ao's median / this median (>1: mono_quant is faster).\n")
    print(markdown_table(rows))
    if torch_ao() is None:
        print("\ntorch.ao.quantization is not importable here: no baseline column.")
    reason = triton_skip_reason(device)
    if reason:
        print(f"\nTriton path not timed: {reason}.")
    return 0
