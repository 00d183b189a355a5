"""Benchmarks of the observer updates: Triton kernels vs torch path vs torch.ao, with the measured ceiling.

For each size and dtype it times (``triton.testing.do_bench``, median ms) one observer update on the same
tensor: fused min/max, EMA, per-channel (``[tokens, hidden]``, ``ch_axis=-1``), histogram steady state
(``--strategies``), the torch reference path on the same device, ``torch.ao``'s MinMaxObserver,
PerChannelMinMaxObserver and HistogramObserver (up to 1e8), a probe of ``torch.histc`` alone on the bin
numbers, and a plain ``x.sum()`` / ``x.clone()`` as the read and copy bandwidth ceilings. GB/s counts the
bytes of one read of ``x``. Prints each row as it is measured and rewrites ``gpu_bench.json`` after each
(size, dtype), so a run cut short keeps its rows.

``--smoke``: tiny sizes on CPU under ``TRITON_INTERPRET=1`` (wall-clock timing instead of do_bench), so the
script's logic is checked on machines without a GPU; the numbers mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _timer(smoke: bool):
    if smoke:

        def bench(fn, reps=3):
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps * 1e3

        return bench
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=40)


def _cases(mono_quant, device, strategies):
    """name -> factory(x) returning a zero-argument callable that runs one update on x."""
    mk = lambda cls, **kw: lambda x: (lambda o: lambda: o(x))(cls(**kw).to(device))
    cases = {
        "minmax": mk(mono_quant.MinMaxObserver, backend="triton"),
        "ema": mk(mono_quant.MovingAverageMinMaxObserver, backend="triton"),
        "minmax_torch": mk(mono_quant.MinMaxObserver, backend="torch"),
        "ema_torch": mk(mono_quant.MovingAverageMinMaxObserver, backend="torch"),
        "per_channel": lambda x: _per_channel(mono_quant, x, "triton", device),
        "per_channel_torch": lambda x: _per_channel(mono_quant, x, "torch", device),
        "hist_torch": lambda x: _steady_hist(mono_quant, x, "torch", None, device),
    }
    for s in strategies:
        cases[f"hist_{s}"] = lambda x, s=s: _steady_hist(mono_quant, x, "triton", s, device)
    cases["probe_histc"] = _histc_probe
    cases["probe_minmax_launcher"] = _launcher_probe
    for k in PROGRAMS_PER_SM_PROBES:
        cases[f"probe_minmax_{k}_per_sm"] = lambda x, k=k: _programs_probe(mono_quant, x, k, device)
    return cases


def _launcher_probe(x):
    """A probe: the MinMax launcher alone (``kernels.minmax_update_``: its two launches, without the observer
    and dispatch layers). On small tensors, where the host decides, minmax minus this is our Python per call
    and this is mostly Triton's launch path (for many small layers: 69 us a call against torch.ao's 52)."""
    from mono_quant import kernels
    from mono_quant.state import RangeState

    state = RangeState.empty((), x.device)
    return lambda: kernels.minmax_update_(x, state)


PROGRAMS_PER_SM_PROBES = (3, 4, 8, 12)  # the kernels launch _common.PROGRAMS_PER_SM (6) per SM


def _programs_probe(mono_quant, x, k, device):
    """A probe: MinMax with ``k`` persistent programs per SM instead of ``_common.PROGRAMS_PER_SM`` (whole
    waves of resident programs: 8 per SM made MinMax 7 % slower than 6 at 1e9 values on the H200)."""
    from mono_quant.kernels import _common

    o = mono_quant.MinMaxObserver(backend="triton").to(device)

    def run():
        default, _common.PROGRAMS_PER_SM = _common.PROGRAMS_PER_SM, k
        try:
            o(x)
        finally:
            _common.PROGRAMS_PER_SM = default

    return run


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


def _print_row(r: dict) -> None:
    ms = f"{r['ms']:.4f}" if r["ms"] else "fail"
    gbps = f"{r.get('GBps', 0):.0f}"
    frac = f"{r['of_read_ceiling']:.2f}" if r.get("of_read_ceiling") else ""
    print(f"{r['case']:22} {r['dtype']:9} {r['n']:>11} {ms:>10} {gbps:>8} {frac:>11}", flush=True)


BASELINES = {  # case -> (torch.ao case, mono_quant torch-path case) it is compared with
    "minmax": ("ao_minmax", "minmax_torch"),
    "ema": ("ao_minmax", "ema_torch"),
    "per_channel": ("ao_per_channel", "per_channel_torch"),
}
HIST_BASELINES = ("ao_histogram", "hist_torch")  # of every hist_<strategy> case


def _baselines(case: str) -> tuple[str, str] | None:
    if case.startswith("hist_") and case != "hist_torch":
        return HIST_BASELINES
    return BASELINES.get(case)


def markdown(data: dict) -> str:
    """A results JSON of this script as a markdown table: the Triton cases beside torch.ao and the torch path
    measured on the same tensor in the same run (ratios: baseline ms / Triton ms, above 1 is faster)."""
    meta, rows = data["meta"], data["rows"]
    ms = {(r["case"], r["dtype"], r["n"]): r["ms"] for r in rows}
    ratio = lambda base, t: f"{base / t:.2f}x" if base and t else ""
    lines = [
        f"{meta['device']}, torch {meta['torch']}, triton {meta.get('triton')}, {meta['date']}; "
        f"{meta.get('data', 'randn')} data; median ms by triton.testing.do_bench",
        "",
        "| observer | dtype | elements | Triton ms | GB/s | of x.sum() | torch.ao ms | vs torch.ao "
        "| torch path ms | vs torch path |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if _baselines(r["case"]) is None:
            continue
        ao, torch_path = (ms.get((c, r["dtype"], r["n"])) for c in _baselines(r["case"]))
        t = r["ms"]
        cells = [
            r["case"], r["dtype"], f"{r['n']:.0e}", f"{t:.3f}" if t else "fail", f"{r.get('GBps', 0):.0f}",
            f"{r['of_read_ceiling']:.0%}" if r.get("of_read_ceiling") else "",
            f"{ao:.3f}" if ao else "", ratio(ao, t), f"{torch_path:.3f}" if torch_path else "",
            ratio(torch_path, t),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    probes = [r for r in rows if r["case"].startswith("probe_")]
    if probes:
        lines += ["", "Probes (inputs to the next kernel changes, not observers):", "",
                  "| probe | dtype | elements | ms | GB/s | of x.sum() |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in probes:
            t, frac = r["ms"], r.get("of_read_ceiling")
            cells = [r["case"], r["dtype"], f"{r['n']:.0e}", f"{t:.3f}" if t else "fail",
                     f"{r.get('GBps', 0):.0f}", f"{frac:.0%}" if frac else ""]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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

    device = "cpu" if args.smoke else "cuda"
    default = "10000,40960" if args.smoke else "10000,1000000,100000000,1000000000"
    sizes = [int(float(s)) for s in (args.sizes or default).split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    bench = _timer(args.smoke)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "data": args.data,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "triton": __import__("triton").__version__,
        "default_hist_strategy": khist.HIST_STRATEGY,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json" if args.data == "randn" else f"gpu_bench-{args.data}.json")
    print(f"{meta}\n{'case':22} {'dtype':9} {'n':>11} {'ms':>10} {'GB/s':>8} {'x read ceil':>11}", flush=True)
    rows = []
    for dtype in dtypes:
        for n in sizes:
            if args.data == "randn":
                x = torch.randn(n, device=device, dtype=dtype)
            else:  # [tokens, 1000], outlier channels and spikes: most values in a few histogram bins
                x = activation(n, dtype, device).view(-1)
            n = x.numel()
            nbytes = x.numel() * x.element_size()
            fns = _ceilings(x)
            fns.update({k: f(x) for k, f in _cases(mono_quant, device, strategies).items()})
            fns.update(_torch_ao(x))
            times = {}
            for name, fn in fns.items():
                if n >= 500_000_000 and name in (
                    "hist_torch",
                    "minmax_torch",
                    "ema_torch",
                    "per_channel_torch",
                ):
                    continue  # several passes each: they would take the script past its time budget
                try:
                    times[name] = bench(fn)
                except Exception as e:  # a failing case is reported, the rest still runs
                    times[name] = None
                    print(f"{name} n={n} {dtype}: {type(e).__name__}: {e}", file=sys.stderr)
            read_ms = times["read_ceiling_sum"]
            copy_ms = times["copy_ceiling_clone"]
            for name, ms in times.items():
                row = {"case": name, "n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms}
                if ms:
                    row["GBps"] = nbytes / ms / 1e6
                    row["of_read_ceiling"] = read_ms / ms if read_ms else None
                    row["of_copy_bw"] = (nbytes / ms) / (2 * nbytes / copy_ms) if copy_ms else None
                rows.append(row)
                _print_row(row)
            with open(path, "w") as f:  # after each group: a run cut at its time limit keeps what it measured
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            fns = x = None
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
