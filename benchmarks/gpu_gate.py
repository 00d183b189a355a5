"""The exactness gate of ``gpu_check.sh``: every kernel, default and opt-in, against the torch path.

Each MinMax kernel (``kernels.minmax.MINMAX_KERNELS``), per tensor and per channel, with and without the
moving average, and each histogram binning (``kernels.histogram.HIST_STRATEGIES``, read at run time), run
on sequences of batches beside ``mono_quant.reference`` on the same device; the states must be equal bit
for bit after every batch. Data: randn, LLM-like activations (``mono_quant.bench.activation``), ranges
growing to the left, the right and both, NaN / +-Inf placed in chosen tiles (the first, one a few tiles
on, the last full one) and in the ragged tail, a batch with nothing finite; fp32, bf16 and fp16 (fp64
where the kernels cast it), sizes around the tile and past a full wave of persistent programs. The
segmented kernels (MoE experts: min/max per tensor and per channel, with and without the moving average,
and the histogram) against the torch twin, top-1 and top-2 routing under a token mask.

Writes ``gate.json`` (every case, pass or fail, rewritten after each kernel) and prints one line per
kernel; exits 1 when any case fails. ``--smoke``: the same cases at small sizes on the CPU under
``TRITON_INTERPRET=1`` (checks the script, and the kernels in the interpreter).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections import namedtuple

import torch


def _sequences(n: int, tile: int, dtype: torch.dtype, device: str, activation) -> dict[str, list]:
    """name -> batches (1-D tensors of ``dtype``) for the per-tensor and histogram cases."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda m, s=1.0, o=0.0: (torch.randn(m, generator=gen) * s + o).to(device=device, dtype=dtype)
    nonfinite = randn(n)
    last_full = (n // tile - 1) * tile
    for pos, value in ((3, "nan"), (5 * tile + 7, "inf"), (last_full + tile // 2, "-inf"), (n - 1, "nan")):
        if 0 <= pos < n:
            nonfinite[pos] = float(value)
    all_bad = torch.full((tile + 3,), float("nan"), device=device, dtype=dtype)
    all_bad[1::2] = float("-inf")
    return {
        "randn, growing left, both sides, right": [randn(n), randn(n, 1, -3), randn(n, 5, 1), randn(n, 1, 9)],
        "llm-like": [activation(n, dtype, device, seed=s).view(-1) for s in (0, 1)],
        "nan/inf in chosen tiles and the tail": [randn(n), nonfinite, all_bad, randn(n, 2, 0)],
        "sizes around the tile": [randn(m, 1, i) for i, m in enumerate((1, tile - 1, tile, tile + 1, 7))],
    }


def _channel_cases(small: bool) -> list[tuple[tuple[int, ...], int]]:
    if small:
        return [((33, 70), -1), ((2, 9, 130), 1), ((4, 6, 5, 5), 0), ((4, 6, 5, 5), 1), ((4, 6, 5, 5), 3)]
    return [
        ((4099, 1024), -1),  # [tokens, hidden]
        ((4, 513, 768), -1),  # [batch, seq, hidden]
        ((4, 513, 768), 1),
        ((32, 64, 14, 14), 0),  # NCHW along every axis
        ((32, 64, 14, 14), 1),
        ((32, 64, 14, 14), 2),
        ((32, 64, 14, 14), 3),
    ]


def _equal(a, b) -> str | None:
    for name, g, w in zip(a._fields, a, b, strict=True):
        if not torch.equal(g, w):
            return f"{name}: kernel {g.flatten()[:6].tolist()} != torch {w.flatten()[:6].tolist()}"
    return None


def _run_case(update, reference_update, state_of, batches) -> str | None:
    """Feed ``batches`` to both updates; the first difference, or ``None``."""
    got, want = state_of(), state_of()
    for i, x in enumerate(batches):
        update(x, got)
        reference_update(x, want)
        diff = _equal(got, want)
        if diff:
            return f"batch {i}: {diff}"
    return None


def gate(
    smoke: bool, out: str, only: list[str] | None = None, dtypes: list[torch.dtype] | None = None
) -> int:
    from mono_quant.kernels import histogram as khist
    from mono_quant.kernels import minmax as kmm

    from mono_quant import kernels, reference
    from mono_quant.bench import activation
    from mono_quant.state import HistogramState, RangeState

    device = "cpu" if smoke else "cuda"
    tile = kmm.BLOCK
    # past a full wave of persistent programs, so that programs loop over several tiles
    waves = 3 if smoke else 2 * kmm.max_programs(torch.empty(1, device=device))
    n = waves * tile + 12_345 % tile
    dtypes = dtypes or [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    chosen = lambda name: not only or any(part in name for part in only)
    minmax_kernels = getattr(kmm, "MINMAX_KERNELS", (None,))
    default_kernel = getattr(kmm, "MINMAX_KERNEL", None)
    results, failed = [], 0
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "n": n, "tile": tile,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": smoke}  # fmt: skip

    def record(kernel: str, case: str, dtype, update, reference_update, state_of, batches) -> None:
        nonlocal failed
        t = time.perf_counter()
        try:
            diff = _run_case(update, reference_update, state_of, batches)
        except Exception as e:  # a crash is a failure of that case; the gate goes on
            diff = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        ok = diff is None
        failed += not ok
        results.append({"kernel": kernel, "case": case, "dtype": str(dtype).removeprefix("torch."),
                        "ok": ok, "detail": diff, "s": round(time.perf_counter() - t, 3)})  # fmt: skip
        if not ok:
            print(f"FAIL {kernel} | {case} | {dtype}: {diff}", flush=True)

    def flush(kernel: str, t0: float) -> None:
        mine = [r for r in results if r["kernel"] == kernel]
        bad = sum(not r["ok"] for r in mine)
        print(f"gate {kernel:28} {len(mine) - bad:4}/{len(mine)} exact  {time.perf_counter() - t0:6.1f} s",
              flush=True)  # fmt: skip
        with open(os.path.join(out, "gate.json"), "w") as f:
            json.dump({"meta": meta, "failed": failed, "results": results}, f, indent=1)

    from mono_quant.kernels import _common

    fast_default = getattr(_common, "FAST_LAUNCH", None)
    for k, fast in [
        (k, f) for k in minmax_kernels for f in ((None,) if fast_default is None else (False, True))
    ]:
        kw = {} if k is None else {"kernel": k}
        name = f"minmax[{k or 'default'}{'+fast_launch' if fast else ''}]"
        name += " (default)" if k == default_kernel and fast == fast_default else ""
        if not chosen(name):
            continue
        if fast is not None:  # the scratch cache and direct launches (opt-in): the same bits
            _common.FAST_LAUNCH = fast
        t0 = time.perf_counter()
        for dtype in dtypes:
            seqs = _sequences(n if dtype != torch.float64 else tile + 5, tile, dtype, device, activation)
            for case, batches in seqs.items():
                for c in (None, 0.1, 1.0):
                    record(name, f"per tensor, c={c}, {case}", dtype,
                           functools.partial(_per_tensor, kernels.minmax_update_, c=c, kw=kw),
                           functools.partial(_per_tensor, reference.minmax_update_, c=c, kw={}),
                           functools.partial(RangeState.empty, (), device), batches)  # fmt: skip
            if dtype == torch.float64:
                continue
            for shape, axis in _channel_cases(smoke):
                gen = torch.Generator(device="cpu").manual_seed(1)
                batches = [(torch.randn(shape, generator=gen) * s + o).to(device=device, dtype=dtype)
                           for s, o in ((1, 0), (2, -3), (0.5, 4))]  # fmt: skip
                batches[1].view(-1)[::97] = float("nan")
                batches[2].view(-1)[5::1013] = float("inf")
                for c in (None, 0.1):
                    record(name, f"per channel {shape} axis {axis}, c={c}", dtype,
                           functools.partial(_per_channel, kernels.minmax_per_channel_update_, axis, c, kw),
                           functools.partial(_per_channel, reference.minmax_per_channel_update_, axis, c, {}),
                           functools.partial(RangeState.empty, (shape[axis],), device), batches)  # fmt: skip
        flush(name, t0)

    if fast_default is not None:
        _common.FAST_LAUNCH = fast_default

    for strategy in khist.HIST_STRATEGIES:
        name = f"histogram[{strategy}]" + (" (default)" if strategy == khist.HIST_STRATEGY else "")
        if not chosen(name):
            continue
        t0 = time.perf_counter()
        for dtype in [d for d in dtypes if d in (torch.float32, torch.bfloat16)]:
            seqs = _sequences(n, tile, dtype, device, activation)
            concentrated = torch.randn(n, device=device).round().to(dtype)  # a few bins hold almost all
            seqs["concentrated (rounded randn)"] = [concentrated, concentrated * 3]
            for case, batches in seqs.items():
                record(name, case, dtype, functools.partial(_histogram, strategy),
                       reference.histogram_update_, functools.partial(HistogramState.empty, 4098, device),
                       batches)  # fmt: skip
        flush(name, t0)
    if chosen("segments"):
        t0 = time.perf_counter()
        for dtype in [d for d in dtypes if d != torch.float64]:
            for case, state_of, update, reference_update, batches in _segment_cases(smoke, device, dtype):
                record("segments", case, dtype, update, reference_update, state_of, batches)
        flush("segments", t0)
    print(f"gate: {'passed' if not failed else f'{failed} case(s) FAILED'} ({len(results)} cases)")
    return 1 if failed else 0


def _segmented_histogram(num_segments: int, num_bins: int, device):
    """A blank segmented histogram state with its routing counts, one tuple (compared field by field)."""
    from mono_quant.grid import E_MIN
    from mono_quant.state import HistogramState, SegmentState

    fields = namedtuple("SegmentedHistogram", [*HistogramState._fields, "tokens_seen", "invalid"])
    ranges = SegmentState.empty(num_segments, (), device)
    ints = functools.partial(torch.zeros, dtype=torch.int64, device=device)
    grid = ints(num_segments).fill_(E_MIN), ints(num_segments), ints(num_segments, num_bins)
    return fields(*ranges.range, *grid, ranges.tokens_seen, ranges.invalid)


def _segment_cases(smoke: bool, device: str, dtype: torch.dtype):
    """The segmented kernels (MoE experts) against the torch twin: ``(case, state_of, update,
    reference_update, batches)``, each batch ``(x, routing, mask)`` of ``[rows, hidden]`` rows, top-1 and
    top-2 (a row listing one expert twice), an expert that gets no row, a token mask, NaN / +-Inf, a growing
    range; on CUDA the twin is its sync-free path."""
    from mono_quant import kernels, reference_segments
    from mono_quant.state import HistogramState, SegmentState

    experts, hidden = 8, 16 if smoke else 4096
    rows = 13 if smoke else 3 * 1024 + 17  # past a wave of the kernels' persistent programs on an H200
    gen = torch.Generator(device="cpu").manual_seed(3)
    routed = {}
    for k in (1, 2):
        batches = []
        for scale in (1.0, 4.0, 0.5):
            x = (torch.randn(rows, hidden, generator=gen) * scale).to(dtype)
            x.view(-1)[:: 7 * hidden + 3] = float("nan")
            x.view(-1)[5 :: 11 * hidden + 1] = float("-inf")
            idx = torch.randint(0, experts - 1, (rows, k), generator=gen)  # the last expert gets no row
            idx[0] = 2  # listed twice under top-2: counts once
            mask = torch.rand(rows, generator=gen) > 0.2
            batches.append(tuple(t.to(device) for t in (x, idx.squeeze(1) if k == 1 else idx, mask)))
        routed[f"top-{k}"] = batches

    def minmax(impl, c, axis):
        return lambda b, st: impl.minmax_segments_update_(b[0], b[1], st, c, ch_axis=axis, mask=b[2])

    def histogram(impl):
        def update(b, st):
            hist = HistogramState(*st[:6])
            impl.histogram_segments_update_(b[0], b[1], hist, st.tokens_seen, st.invalid, mask=b[2])

        return update

    num_bins = 34 if smoke else 4098
    for name, batches in routed.items():
        for axis, c in ((None, None), (None, 0.1), (-1, None), (-1, 0.1)):
            shape = () if axis is None else (hidden,)
            yield (f"min/max {'per channel' if axis else 'per tensor'}, c={c}, {name}",
                   functools.partial(SegmentState.empty, experts, shape, device),
                   minmax(kernels, c, axis), minmax(reference_segments, c, axis), batches)  # fmt: skip
        yield (f"histogram, {name}", functools.partial(_segmented_histogram, experts, num_bins, device),
               histogram(kernels), histogram(reference_segments), batches)  # fmt: skip


def _per_tensor(update, x, state, c, kw):
    update(x, state, c, **kw)


def _per_channel(update, axis, c, kw, x, state):
    update(x, axis, state, c, **kw)


def _histogram(strategy, x, state):
    from mono_quant.kernels import histogram as khist

    khist.histogram_update_(x, state, strategy=strategy)


def _kernel_names() -> list[str]:
    """The ``--only`` names of every kernel the gate runs (each picks exactly that kernel)."""
    from mono_quant.kernels import _common
    from mono_quant.kernels import histogram as khist
    from mono_quant.kernels import minmax as kmm

    fast = (False, True) if hasattr(_common, "FAST_LAUNCH") else (False,)
    names = [f"minmax[{k}{'+fast_launch' if f else ''}]" for k in getattr(kmm, "MINMAX_KERNELS", ("default",))
             for f in fast]  # fmt: skip
    return names + [f"histogram[{s}]" for s in khist.HIST_STRATEGIES] + ["segments"]


def _parallel(args, jobs: int) -> int:
    """The gate as one process per kernel, ``jobs`` at a time (compiling is CPU-bound and each process
    compiles its own kernels), merged into one ``gate.json``."""
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str):
        out = tempfile.mkdtemp(prefix="gate-")
        cmd = [sys.executable, __file__, "--out", out, "--only", name, "--jobs", "1"]
        cmd += ["--smoke"] * args.smoke + (["--dtypes", args.dtypes] if args.dtypes else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        try:
            with open(os.path.join(out, "gate.json")) as f:
                return done, json.load(f)
        except (OSError, ValueError):
            return done, None

    merged, failed, names = {"meta": None, "results": []}, 0, _kernel_names()
    with ThreadPoolExecutor(jobs) as pool:
        for name, (done, data) in zip(names, pool.map(run, names), strict=True):
            print(done.stdout, end="", flush=True)
            if data is None or done.returncode not in (0, 1):
                print(f"FAIL {name}: the gate process ended with {done.returncode}\n{done.stderr[-2000:]}")
                merged["results"].append(
                    {"kernel": name, "case": "process", "ok": False, "detail": done.stderr[-2000:]}
                )
                failed += 1
                continue
            merged["meta"] = merged["meta"] or data["meta"]
            merged["results"] += data["results"]
            failed += data["failed"]
    merged["failed"] = failed
    with open(os.path.join(args.out, "gate.json"), "w") as f:
        json.dump(merged, f, indent=1)
    print(f"gate: {'passed' if not failed else f'{failed} case(s) FAILED'} ({len(merged['results'])} cases, "
          f"{len(names)} processes)")  # fmt: skip
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small sizes on CPU under the Triton interpreter")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gate.json")
    p.add_argument("--only", help="comma list: run the kernels whose name holds one of these (minmax, histc)")
    p.add_argument("--dtypes", help="comma list of torch dtypes (default float32,bfloat16,float16,float64)")
    p.add_argument("--jobs", type=int, default=1, help="processes at a time, one per kernel (default 1)")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1" if args.smoke else "0"  # before the kernels are imported
    os.makedirs(args.out, exist_ok=True)
    if args.jobs > 1 and not args.only:
        return _parallel(args, args.jobs)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else None
    return gate(args.smoke, args.out, args.only.split(",") if args.only else None, dtypes)


if __name__ == "__main__":
    sys.exit(main())
