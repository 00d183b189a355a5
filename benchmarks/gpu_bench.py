"""Benchmarks of the observer updates on a GPU: every configuration beside ``x.sum()``, torch.ao and ModelOpt.

For each size and dtype it times (``triton.testing.do_bench``, medians in ms) one observer update on the
same tensor: MinMax, EMA and per-channel (``[tokens, hidden]``, ``ch_axis=-1``) with each MinMax kernel
(``kernels.minmax.MINMAX_KERNELS``: the default as ``minmax``, the others as ``minmax_<kernel>``), the
histogram steady state with each binning (``--strategies``), the torch reference path on the same device,
``torch.ao``'s observers (its histogram up to 1e8), ModelOpt's ``MaxCalibrator.collect`` and
``HistogramCalibrator.collect`` (``mo_*``, where ``modelopt`` imports), probes (``torch.histc`` alone, the
MinMax launcher alone, programs per SM), and a plain ``x.sum()`` / ``x.clone()`` as the read and copy
ceilings. GB/s counts the bytes of one read of ``x``; ``of_read_ceiling`` is ``x.sum()``'s time over the
case's; ``default`` marks what a user gets without settings. ``--extra layers,host`` adds two rows of
issue 11: 200 layers ``[2048, 4096]`` one steady-state step each (``layers_*``), and the host time of one
update of 1e4 values (``host_*``, wall clock per call over a loop, no synchronization per call). Prints
each row as it is measured and rewrites ``gpu_bench.json`` after each (size, dtype), so a run cut short
keeps its rows. ``--report JSON`` / ``--summary FOLDER``: the tables of ``gpu_results`` (a results JSON as
markdown; the short table of issue 11's rows from the JSONs in FOLDER, printed and written to
``gpu_check.md``).

``--smoke``: tiny sizes on CPU under ``TRITON_INTERPRET=1`` (wall-clock timing instead of do_bench), so the
script's logic is checked on machines without a GPU; the numbers mean nothing there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_results, beside this file
from gpu_results import markdown, summary  # noqa: E402


def _timer(smoke: bool):
    if smoke:

        def bench(fn, reps=1):  # one call after the warm-up: the interpreter's times mean nothing
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps * 1e3

        return bench
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _setting(module, name: str, value, fn):
    """``fn`` run with ``module.name`` set to ``value`` (an opt-in kernel, as its environment variable
    would choose it at import), restored after each call."""

    def run():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, old)

    return run


def _minmax_kernels():
    """``(module, names, default)`` of the MinMax kernels (one name, None, before there were several)."""
    from mono_quant.kernels import minmax as kmm

    return kmm, getattr(kmm, "MINMAX_KERNELS", (None,)), getattr(kmm, "MINMAX_KERNEL", None)


def _minmax_variants():
    """``(suffix, settings)`` of every MinMax configuration: each kernel of ``MINMAX_KERNELS``, with and
    without ``_common.FAST_LAUNCH``; the default has no settings and suffix ``""``."""
    from mono_quant.kernels import _common

    kmm, names, default = _minmax_kernels()
    fast_default = getattr(_common, "FAST_LAUNCH", None)
    out = []
    for k in names:
        for fast in (fast_default,) if fast_default is None else (fast_default, not fast_default):
            settings = [(kmm, "MINMAX_KERNEL", k)] if k != default else []
            if fast != fast_default:
                settings.append((_common, "FAST_LAUNCH", fast))
            suffix = ("" if k == default else f"_{k}") + (
                "" if fast == fast_default else "_fast" if fast else "_slow"
            )
            out.append((suffix, settings))
    return out


def _with(settings, fn):
    """``fn`` run under ``settings`` (``(module, name, value)`` each, as ``_setting``)."""
    for module, name, value in settings:
        fn = _setting(module, name, value, fn)
    return fn


def _cases(mono_quant, device, strategies):
    """name -> factory(x) returning a zero-argument callable that runs one update on x."""
    mk = lambda cls, **kw: lambda x: (lambda o: lambda: o(x))(cls(**kw).to(device))
    cases = {}
    for suffix, settings in _minmax_variants():
        opt = lambda f, settings=settings: lambda x: _with(settings, f(x))
        cases[f"minmax{suffix}"] = opt(mk(mono_quant.MinMaxObserver, backend="triton"))
        cases[f"ema{suffix}"] = opt(mk(mono_quant.MovingAverageMinMaxObserver, backend="triton"))
        cases[f"per_channel{suffix}"] = opt(lambda x: _per_channel(mono_quant, x, "triton", device))
    cases.update({
        "minmax_torch": mk(mono_quant.MinMaxObserver, backend="torch"),
        "ema_torch": mk(mono_quant.MovingAverageMinMaxObserver, backend="torch"),
        "per_channel_torch": lambda x: _per_channel(mono_quant, x, "torch", device),
        "hist_torch": lambda x: _steady_hist(mono_quant, x, "torch", None, device),
    })  # fmt: skip
    for s in strategies:
        cases[f"hist_{s}"] = lambda x, s=s: _steady_hist(mono_quant, x, "triton", s, device)
    cases["probe_histc"] = _histc_probe
    cases["probe_minmax_launcher"] = _launcher_probe
    for k in PROGRAMS_PER_SM_PROBES:
        cases[f"probe_minmax_{k}_per_sm"] = lambda x, k=k: _programs_probe(mono_quant, x, k, device)
    return cases


def _is_default(case: str) -> bool:
    """Whether ``case`` is the configuration a user gets without settings (the observer, ``auto`` backend
    on CUDA, the default kernel or binning)."""
    from mono_quant.kernels import histogram as khist

    base = case.removeprefix("layers_").removeprefix("host_")
    return base in ("minmax", "ema", "per_channel", f"hist_{khist.HIST_STRATEGY}")


def _launcher_probe(x):
    """A probe: the MinMax launcher alone (``kernels.minmax_update_``, without the observer and dispatch
    layers). On small tensors, where the host decides, minmax minus this is our Python per call and this is
    mostly Triton's launch path."""
    from mono_quant import kernels
    from mono_quant.state import RangeState

    state = RangeState.empty((), x.device)
    return lambda: kernels.minmax_update_(x, state)


PROGRAMS_PER_SM_PROBES = (3, 4, 8, 12)  # the kernels launch _common.PROGRAMS_PER_SM (6) per SM


def _programs_probe(mono_quant, x, k, device):
    """A probe: MinMax with ``k`` persistent programs per SM instead of ``_common.PROGRAMS_PER_SM``."""
    from mono_quant.kernels import _common

    return _setting(
        _common, "PROGRAMS_PER_SM", k, _bound(mono_quant.MinMaxObserver(backend="triton").to(device), x)
    )


def _bound(observer, x):
    return lambda: observer(x)


def _histc_probe(x):
    """A probe, not an observer: ``torch.histc`` alone on the bin numbers of ``x`` (4098 bins of width
    2**-8 around zero, as the 2048-bin observer's grid for randn), i.e. what counting in shared memory
    costs on this GPU, beside the Triton binning of the same values."""
    bins = (torch.floor(x.float() * 256) + 2049).clamp_(0, 4097)
    return lambda: torch.histc(bins, bins=4098, min=-0.5, max=4097.5)


def _hidden(x) -> int:
    """The widest LLM-like hidden size that divides n (1e9 -> 2560, 1e8 -> 1280, 1e6 -> 320)."""
    return next(h for h in (4096, 2560, 1280, 640, 320, 160, 80, 16, 1) if x.numel() % h == 0)


def _per_channel(mono_quant, x, backend, device):
    o = mono_quant.PerChannelMinMaxObserver(ch_axis=-1, backend=backend).to(device)
    v = x.view(-1, _hidden(x))
    return lambda: o(v)


def _steady_hist(mono_quant, x, backend, strategy, device):
    o = mono_quant.HistogramObserver(bins=2048, backend=backend).to(device)
    o(x)  # the grid now covers x: later calls are the steady state
    if strategy is None:
        return lambda: o(x)
    from mono_quant.kernels import histogram as khist

    return lambda: khist.histogram_update_(x, o.state(), strategy=strategy)


def _ceilings(x):
    """A plain read (``x.sum()``) and a plain copy (``x.clone()``) of the same tensor."""
    return {"read_ceiling_sum": lambda: x.sum(), "copy_ceiling_clone": lambda: x.clone()}


def _torch_ao(x):
    """torch.ao's observers on the same tensor (bf16 too: torch >= 2.11 copies it to fp32 inside)."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

    mm = MinMaxObserver().to(x.device)
    pc = PerChannelMinMaxObserver(ch_axis=-1).to(x.device)
    v = x.view(-1, _hidden(x))
    out = {"ao_minmax": lambda: mm(x), "ao_per_channel": lambda: pc(v)}
    if x.numel() <= 100_000_000:  # torch.ao's histogram is slow: keep the script within its budget
        h = HistogramObserver().to(x.device)
        try:
            h(x)
            out["ao_histogram"] = lambda: h(x)
        except (NotImplementedError, RuntimeError) as e:  # torch 2.11: no bf16 torch.histc on CUDA
            print(f"ao_histogram n={x.numel()} {x.dtype}: {type(e).__name__}: {e}", file=sys.stderr)
    return out


@functools.cache
def _modelopt_calibrators():
    """ModelOpt's ``(MaxCalibrator, HistogramCalibrator)``, or ``None`` where ``modelopt`` does not import."""
    try:
        from modelopt.torch.quantization.calib import HistogramCalibrator, MaxCalibrator
    except Exception as e:  # not installed, or one of its many dependencies missing
        print(f"ModelOpt not timed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return MaxCalibrator, HistogramCalibrator


def _modelopt(x):
    """ModelOpt's calibrators on the same tensor: ``collect`` of the max (per tensor and per channel, its
    ``axis`` being the kept one) and of its |x| histogram (2048 bins, ``torch.histc``)."""
    calibrators = _modelopt_calibrators()
    if calibrators is None:
        return {}
    max_cal, hist_cal = calibrators
    v = x.view(-1, _hidden(x))
    mx, pc, h = max_cal(8, None, False), max_cal(8, -1, False), hist_cal(8, None, False, num_bins=2048)
    h.collect(x)  # its bins now cover x: the steady state, as ours
    return {
        "mo_max": lambda: mx.collect(x),
        "mo_per_channel": lambda: pc.collect(v),
        "mo_histogram": lambda: h.collect(x),
    }


# --- the rows of many small layers and of host time -----------------------------------------------------
def _llm_like(shape, dtype, device, seed):
    """LLM-like activations made on the device (``mono_quant.bench.activation``'s recipe: outlier channels
    twenty times wider, spikes), so that 200 layers take no time to make."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device)
    x[:, :: max(1, shape[1] // 8)] *= 20.0
    spikes = torch.randint(0, x.numel(), (max(1, x.numel() // 100_000),), generator=gen, device=device)
    x.view(-1)[spikes] *= 50.0
    return x.to(dtype)


def _layer_cases(mono_quant, xs, device):
    """name -> callable stepping one observer per tensor of ``xs`` (steady state: each has seen its
    tensor once)."""

    def each(make, update=None):
        observers = [make() for _ in xs]
        for o, x in zip(observers, xs):
            (update or (lambda o, x: o(x)))(o, x)
        step = update or (lambda o, x: o(x))
        return lambda: [step(o, x) for o, x in zip(observers, xs)]

    tri = lambda cls, **kw: lambda: cls(backend="triton", **kw).to(device)
    cases = {}
    for suffix, settings in _minmax_variants():
        opt = lambda f, settings=settings: _with(settings, f)
        cases[f"layers_minmax{suffix}"] = opt(each(tri(mono_quant.MinMaxObserver)))
        cases[f"layers_per_channel{suffix}"] = opt(each(tri(mono_quant.PerChannelMinMaxObserver, ch_axis=-1)))
    from mono_quant.kernels import histogram as khist

    cases[f"layers_hist_{khist.HIST_STRATEGY}"] = each(tri(mono_quant.HistogramObserver, bins=2048))
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver

    cases["layers_ao_minmax"] = each(lambda: MinMaxObserver().to(device))
    cases["layers_ao_per_channel"] = each(lambda: PerChannelMinMaxObserver(ch_axis=-1).to(device))
    if xs[0].dtype != torch.bfloat16 or device == "cpu":  # torch 2.11: no bf16 torch.histc on CUDA
        cases["layers_ao_histogram"] = each(lambda: HistogramObserver().to(device))
    calibrators = _modelopt_calibrators()
    if calibrators is not None:
        max_cal, hist_cal = calibrators
        collect = lambda c, x: c.collect(x)
        cases["layers_mo_max"] = each(lambda: max_cal(8, None, False), collect)
        cases["layers_mo_per_channel"] = each(lambda: max_cal(8, -1, False), collect)
        cases["layers_mo_histogram"] = each(lambda: hist_cal(8, None, False, num_bins=2048), collect)
    cases["layers_read_ceiling_sum"] = lambda: [x.sum() for x in xs]
    return cases


def _host_ms(fn, device, calls: int) -> float:
    """Wall-clock ms per call of ``fn`` over a loop of ``calls`` calls without synchronizing in between
    (the host's cost per update where the GPU keeps up), the median of five loops."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return sorted(times)[2]


def _host_cases(mono_quant, x, device):
    """name -> callable: one update of ``x`` (1e4 values) by each observer, torch.ao's and ModelOpt's."""
    tri = lambda cls, **kw: cls(backend="triton", **kw).to(device)
    cases = {}
    for suffix, settings in _minmax_variants():
        opt = lambda f, settings=settings: _with(settings, f)
        cases[f"host_minmax{suffix}"] = opt(_bound(tri(mono_quant.MinMaxObserver), x))
        cases[f"host_ema{suffix}"] = opt(_bound(tri(mono_quant.MovingAverageMinMaxObserver), x))
        cases[f"host_per_channel{suffix}"] = opt(
            _bound(tri(mono_quant.PerChannelMinMaxObserver, ch_axis=-1), x.view(10, -1))
        )
    from mono_quant.kernels import histogram as khist

    cases[f"host_hist_{khist.HIST_STRATEGY}"] = _steady_hist(mono_quant, x, "triton", None, device)
    cases["host_probe_minmax_launcher"] = _launcher_probe(x)
    from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

    cases["host_ao_minmax"] = _bound(MinMaxObserver().to(device), x)
    cases["host_ao_ema"] = _bound(MovingAverageMinMaxObserver().to(device), x)
    calibrators = _modelopt_calibrators()
    if calibrators is not None:
        cal = calibrators[0](8, None, False)
        cases["host_mo_max"] = lambda: cal.collect(x)
    cases["host_read_ceiling_sum"] = x.sum
    return cases


def _extra_rows(mono_quant, extra, dtypes, device, smoke, bench):
    """The ``layers`` and ``host`` rows (dicts as the size sweep's), printed as they are measured."""
    rows = []
    for dtype in dtypes if "layers" in extra else ():
        count, shape = (4, (8, 64)) if smoke else (200, (2048, 4096))
        xs = [_llm_like(shape, dtype, device, seed=i) for i in range(count)]
        n, nbytes = sum(x.numel() for x in xs), sum(x.nbytes for x in xs)
        times = {}
        for name, fn in _layer_cases(mono_quant, xs, device).items():
            times[name] = _time(bench, name, fn, f"{count} layers {dtype}")
        rows += _rows(
            times, "layers_read_ceiling_sum", None, n, nbytes, dtype, {"layers": count, "shape": list(shape)}
        )
        xs = None
    if "host" in extra:
        x = torch.randn(10_000, device=device)
        times = {}
        for name, fn in _host_cases(mono_quant, x, device).items():
            times[name] = _time(lambda f: _host_ms(f, device, 20 if smoke else 2000), name, fn, "host 1e4")
        rows += _rows(times, None, None, x.numel(), x.nbytes, x.dtype, {"host_time": True})
    return rows


def _time(bench, name, fn, where):
    try:
        return bench(fn)
    except Exception as e:  # a failing case is reported, the rest still runs
        print(f"{name} {where}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _rows(times, read_key, copy_key, n, nbytes, dtype, extra=None) -> list[dict]:
    read_ms, copy_ms = times.get(read_key), times.get(copy_key)
    rows = []
    for name, ms in times.items():
        row = {"case": name, "n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms,
               "default": _is_default(name), **(extra or {})}  # fmt: skip
        if ms:
            row["GBps"] = nbytes / ms / 1e6
            row["of_read_ceiling"] = read_ms / ms if read_ms else None
            row["of_copy_bw"] = (nbytes / ms) / (2 * nbytes / copy_ms) if copy_ms else None
        rows.append(row)
        _print_row(row)
    return rows


def _print_row(r: dict) -> None:
    ms = f"{r['ms']:.4f}" if r["ms"] else "fail"
    gbps = f"{r.get('GBps', 0):.0f}"
    frac = f"{r['of_read_ceiling']:.2f}" if r.get("of_read_ceiling") else ""
    print(f"{r['case']:28} {r['dtype']:9} {r['n']:>11} {ms:>10} {gbps:>8} {frac:>11}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    p.add_argument("--sizes", default=None, help="comma-separated element counts")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    p.add_argument(
        "--data",
        choices=("randn", "llm"),
        default="randn",
        help="randn, or LLM-like activations (mono_quant.bench.activation: outlier channels 20x wider, "
        "spikes); llm writes gpu_bench-llm.json",
    )
    p.add_argument("--report", metavar="JSON", help="print a results JSON of this script as markdown")
    p.add_argument("--summary", metavar="FOLDER", help="print issue 11's rows from the JSONs in FOLDER")
    p.add_argument(
        "--extra",
        default=None,
        help="comma list of extra rows: layers (200 layers [2048, 4096], one step each), host (host time "
        "of a 1e4-value update); default both on a GPU with --data randn, none otherwise",
    )
    p.add_argument(
        "--probes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the probes too (programs per SM, torch.histc alone, the launcher alone)",
    )
    p.add_argument("--probes-only", action="store_true", help="only the probes and the ceilings")
    p.add_argument(
        "--strategies",
        default="candidates",
        help="histogram binning strategies to time, a comma list of names and of 'default' (histc, or "
        "MONO_QUANT_HIST_STRATEGY), 'candidates' (all but tl_histogram before Triton 3.8) or 'all'",
    )
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(markdown(json.load(f)), end="")
        return 0
    if args.summary:
        return summary(args.summary)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    from mono_quant.kernels import histogram as khist

    import mono_quant  # after TRITON_INTERPRET is settled
    from mono_quant.bench import activation

    everything = khist.HIST_STRATEGIES
    # candidates: every strategy, but tl_histogram only from Triton 3.8 on (before, it lowers to warp
    # votes: 15x slower, measured, and ~30 s of compiling per dtype)
    shared_memory_tl_histogram = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)
    candidates = [s for s in everything if s != "tl_histogram" or shared_memory_tl_histogram]
    named = {"default": [khist.HIST_STRATEGY], "candidates": candidates, "all": list(everything)}
    strategies = list(dict.fromkeys(s for tok in args.strategies.split(",") for s in named.get(tok, [tok])))
    unknown = sorted(set(strategies) - set(khist.HIST_STRATEGIES))
    if unknown:
        p.error(f"--strategies: {unknown} not among {list(khist.HIST_STRATEGIES)}")
    extra = (
        args.extra.split(",")
        if args.extra
        else []
        if args.smoke or args.data != "randn"
        else ["layers", "host"]
    )
    if set(extra) - {"layers", "host"}:
        p.error(f"--extra: {sorted(set(extra) - {'layers', 'host'})} not among ['layers', 'host']")

    device = "cpu" if args.smoke else "cuda"
    default = "10000,40960" if args.smoke else "10000,1000000,100000000,1000000000"
    sizes = [int(float(s)) for s in (args.sizes or default).split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    bench = _timer(args.smoke)
    kmm, _, minmax_kernel = _minmax_kernels()
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "data": args.data,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "triton": triton.__version__,
        "default_hist_strategy": khist.HIST_STRATEGY,
        "default_minmax_kernel": minmax_kernel,
        "modelopt": _modelopt_calibrators() is not None,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json" if args.data == "randn" else f"gpu_bench-{args.data}.json")
    print(f"{meta}\n{'case':28} {'dtype':9} {'n':>11} {'ms':>10} {'GB/s':>8} {'x read ceil':>11}", flush=True)
    rows = []
    for dtype in dtypes:
        for n in sizes:
            if args.data == "randn":
                x = torch.randn(n, device=device, dtype=dtype)
            else:  # [tokens, 1000], outlier channels and spikes: most values in a few histogram bins
                x = activation(n, dtype, device).view(-1)
            fns = _ceilings(x)
            for name, make in _cases(mono_quant, device, strategies).items():
                probe = name.startswith("probe_")
                if (probe and args.probes) or (not probe and not args.probes_only):
                    fns[name] = make(x)
            if not args.probes_only:
                fns.update(_torch_ao(x))
                fns.update(_modelopt(x))
            times = {}
            for name, fn in fns.items():
                if x.numel() >= 500_000_000 and name.endswith("_torch"):
                    continue  # several passes each: they would take the script past its time budget
                times[name] = _time(bench, name, fn, f"n={x.numel()} {dtype}")
            rows += _rows(times, "read_ceiling_sum", "copy_ceiling_clone", x.numel(), x.nbytes, dtype)
            with open(path, "w") as f:  # after each group: a run cut at its time limit keeps what it measured
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            fns = x = None
            if device == "cuda":
                torch.cuda.empty_cache()
    rows += _extra_rows(mono_quant, [] if args.probes_only else extra, dtypes, device, args.smoke, bench)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
