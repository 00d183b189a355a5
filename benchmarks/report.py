"""Turn a results JSON of the benchmark suite into markdown tables and a PNG plot.

Usage::

    python3 benchmarks/report.py results.json                 # markdown on stdout
    python3 benchmarks/report.py results.json --md out.md --plot out.png
    python3 benchmarks/report.py results.json --sizes 1e6,3e7    # a summary: two sizes only

The JSON is what ``pytest benchmarks/ --benchmark-json=results.json`` writes (pytest-benchmark's format,
with the suite's ``extra_info``). Times are medians. ``of ceiling`` is the time of ``x.sum()`` on the same
tensor, measured in the same run, over the observer's time; ``vs torch.ao`` (and ``loop / vectorized``)
is the baseline's median over mono_quant's, so above 1 means mono_quant is faster. matplotlib is only
imported for ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

OBSERVER_KINDS = ("minmax", "moving_average", "histogram", "per_channel", "moving_average_per_channel")
MONO_IMPLS = ("mono_quant-torch", "mono_quant-triton")


def load(path: str | Path) -> tuple[dict, list[dict]]:
    """``(machine_info, results)``: each result is its ``extra_info`` plus ``median_s``, ``group``, ``name``.

    Raises:
        ValueError: the file is not a pytest-benchmark JSON with timings (written without
            ``--benchmark-disable``).
    """
    data = json.loads(Path(path).read_text())
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' key)")
    results = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        if "median" not in stats:
            continue
        row = dict(bench.get("extra_info", {}))
        row.update(median_s=stats["median"], group=bench.get("group"), name=bench.get("name"))
        results.append(row)
    if not results and data["benchmarks"]:
        raise ValueError(f"{path} holds no timings; run the suite without --benchmark-disable")
    return data.get("machine_info", {}), results


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return ""
    r = num / den
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


def _gbs(row: dict | None) -> str:
    if not row or not row.get("bytes"):
        return ""
    return f"{row['bytes'] / row['median_s'] / 1e9:.2f}"


def _frac(row: dict | None) -> str:
    if not row or not row.get("ceiling_sum_s"):
        return ""
    return f"{row['ceiling_sum_s'] / row['median_s']:.0%}"


def _mem(row: dict | None) -> str:
    if not row or row.get("peak_extra_bytes") is None:
        return ""
    n = float(row["peak_extra_bytes"])
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe(machine: dict) -> str:
    """One line on where the results were measured."""
    cpu = machine.get("cpu_model") or machine.get("cpu", {}).get("brand_raw", "?")
    parts = [
        f"device {machine.get('device', '?')}",
        f"CPU {cpu} ({machine.get('cpu_count', '?')} cores, "
        f"{machine.get('torch_threads', '?')} torch threads)",
    ]
    if machine.get("cuda_device"):
        parts.append(f"GPU {machine['cuda_device']}")
    parts.append(f"torch {machine.get('torch', '?')}")
    parts.append(f"profile {machine.get('bench_profile', '?')}")
    if machine.get("load_average_at_end"):
        parts.append("load average at end " + "/".join(f"{v:.1f}" for v in machine["load_average_at_end"]))
    return ", ".join(parts)


def forward_table(results: list[dict], sizes: set[int] | None = None) -> str:
    """Observer forward: one line per (kind, dtype, size), implementations side by side.

    ``sizes``: only these element counts (all when ``None``).
    """
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in results:
        if r.get("case") == "forward" and (sizes is None or r["numel"] in sizes):
            by_case[(r["kind"], r["dtype"], r["numel"])][r["impl"]] = r
    have_triton = any("mono_quant-triton" in impls for impls in by_case.values())
    header = ["observer", "dtype", "elements", "mono_quant torch ms", "GB/s", "of ceiling", "extra memory"]
    if have_triton:
        header += ["mono_quant triton ms", "GB/s", "of ceiling", "extra memory"]
    header += ["torch.ao ms", "GB/s", "extra memory", "vs torch.ao"]
    rows = []
    order = {k: i for i, k in enumerate(OBSERVER_KINDS)}
    for (kind, dtype, numel), impls in sorted(
        by_case.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1] != "float32", kv[0][2])
    ):
        if kind == "ceiling":
            continue
        mono, ao = impls.get("mono_quant-torch"), impls.get("torch.ao")
        line = [
            kind,
            dtype,
            f"{numel:.0e}",
            _ms(mono and mono["median_s"]),
            _gbs(mono),
            _frac(mono),
            _mem(mono),
        ]
        if have_triton:
            tri = impls.get("mono_quant-triton")
            line += [_ms(tri and tri["median_s"]), _gbs(tri), _frac(tri), _mem(tri)]
        best = min((r["median_s"] for name, r in impls.items() if name in MONO_IMPLS), default=None)
        line += [_ms(ao and ao["median_s"]) or "n/a", _gbs(ao), _mem(ao), _ratio(ao and ao["median_s"], best)]
        rows.append(line)
    return _table(header, rows)


def ceiling_table(results: list[dict], sizes: set[int] | None = None) -> str:
    """The ceilings of each test tensor, as benchmarked in the same run."""
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in results:
        if (
            r.get("case") == "forward"
            and r.get("kind") == "ceiling"
            and (sizes is None or r["numel"] in sizes)
        ):
            by_case[(r["dtype"], r["numel"])][r["impl"]] = r
    rows = []
    for (dtype, numel), ops in sorted(by_case.items(), key=lambda kv: (kv[0][0] != "float32", kv[0][1])):
        s, c = ops.get("sum"), ops.get("clone")
        rows.append(
            [dtype, f"{numel:.0e}", _ms(s and s["median_s"]), _gbs(s), _ms(c and c["median_s"]), _gbs(c)]
        )
    return _table(["dtype", "elements", "x.sum() ms", "GB/s read", "x.clone() ms", "GB/s read"], rows)


def search_table(results: list[dict]) -> str:
    """KL threshold search: vectorized vs the per-candidate loops, on the same histogram."""
    by_bins: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in results:
        if r.get("case") == "kl-search":
            by_bins[r["bins"]][r["impl"]] = r
    rows = []
    for bins, impls in sorted(by_bins.items()):
        vec, npl, pyl = (impls.get(k) for k in ("mono_quant-vectorized", "loop-numpy", "loop-python"))
        t = {k: v and v["median_s"] for k, v in (("vec", vec), ("np", npl), ("py", pyl))}
        candidates = next(iter(impls.values())).get("candidates", "")
        rows.append(
            [
                str(bins),
                str(candidates),
                _ms(t["vec"]),
                _ms(t["np"]),
                _ratio(t["np"], t["vec"]),
                _ms(t["py"]) or "not run",
                _ratio(t["py"], t["vec"]),
            ]
        )
    header = [
        "bins",
        "candidates",
        "vectorized ms",
        "numpy loop ms",
        "numpy loop / vectorized",
        "Python loop (ModelOpt-style) ms",
        "Python loop / vectorized",
    ]
    return _table(header, rows)


def qparams_table(results: list[dict]) -> str:
    """``calculate_qparams`` of the histogram observers, mono_quant's methods next to torch.ao's."""
    by_bins: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r.get("case") == "calculate_qparams":
            by_bins[r["bins"]].append(r)
    rows = []
    for bins, rs in sorted(by_bins.items()):
        ao = next((r for r in rs if r["impl"] == "torch.ao"), None)
        for r in rs:
            if r["impl"] == "torch.ao":
                continue
            rows.append(
                [
                    str(bins),
                    r["method"],
                    r["qscheme"],
                    _ms(r["median_s"]),
                    _ms(ao and ao["median_s"]),
                    _ratio(ao and ao["median_s"], r["median_s"]),
                ]
            )
    header = ["bins", "method", "qscheme", "mono_quant ms", "torch.ao ms (affine)", "vs torch.ao"]
    return _table(header, rows)


def layers_table(results: list[dict]) -> str:
    """The many-layers case: all layers' forward (or calculate_qparams), implementations side by side."""
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in results:
        if str(r.get("case", "")).startswith("many-layers"):
            by_case[(r["case"].split()[-1], r["kind"], r["dtype"], r["layers"], tuple(r["layer_shape"]))][
                r["impl"]
            ] = r
    rows = []
    for (what, kind, dtype, layers, shape), impls in sorted(by_case.items()):
        mono, tri, ao = (impls.get(k) for k in ("mono_quant-torch", "mono_quant-triton", "torch.ao"))
        best = min((r["median_s"] for k, r in impls.items() if k in MONO_IMPLS), default=None)
        rows.append(
            [
                what,
                kind,
                dtype,
                f"{layers} x {list(shape)}",
                _ms(mono and mono["median_s"]),
                _frac(mono),
                _ms(tri and tri["median_s"]),
                _ms(ao and ao["median_s"]),
                _ratio(ao and ao["median_s"], best),
            ]
        )
    header = [
        "step",
        "observer",
        "dtype",
        "layers",
        "mono_quant torch ms",
        "of ceiling",
        "mono_quant triton ms",
        "torch.ao ms",
        "vs torch.ao",
    ]
    return _table(header, rows)


def markdown(machine: dict, results: list[dict], title: str = "", sizes: set[int] | None = None) -> str:
    """Every table of one results file, with a line saying where it was measured.

    ``sizes``: element counts shown in the observer table (all when ``None``; the ceilings table follows).
    """
    sections = [
        ("Observer forward (one calibration step, steady state)", lambda rs: forward_table(rs, sizes)),
        ("Ceilings (same tensors, same run)", lambda rs: ceiling_table(rs, sizes)),
        ("KL threshold search, int8 symmetric (same |x| histogram)", search_table),
        ("calculate_qparams of the histogram observers", qparams_table),
        ("Many layers: one calibration step on each", layers_table),
    ]
    out = [f"## {title}" if title else "", f"Measured on: {describe(machine)}.", ""]
    out.append(
        "Median times. GB/s: input bytes read once / time. of ceiling: x.sum() time / time (a plain "
        "pass, not a hard bound: above 100% where the sum itself is slower than a fused min/max). "
        "extra memory: peak allocated above the input during one call. "
        "vs torch.ao (and loop / vectorized): baseline time / mono_quant time, >1 means mono_quant is "
        "faster. Empty torch.ao cells: torch.ao has no such observer or could not run it."
    )
    for heading, fn in sections:
        table = fn(results)
        if table.count("\n") > 1:
            out += ["", f"### {heading}", "", table]
    return "\n".join(out).strip() + "\n"


def plot(machine: dict, results: list[dict], path: str | Path) -> None:
    """A PNG: forward throughput against size for each dtype, and the search times (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in results if r.get("case") == "forward"}, key=lambda d: d != "float32")
    searches = [r for r in results if r.get("case") in ("kl-search", "calculate_qparams")]
    panels = len(dtypes) + (1 if searches else 0)
    if panels == 0:
        raise ValueError("no forward or search results to plot")
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    styles = {"mono_quant-torch": "-", "mono_quant-triton": ":", "torch.ao": "--"}
    colors = dict(zip(OBSERVER_KINDS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, dtype in zip(axes[0], dtypes, strict=False):
        lines: dict[tuple, list] = defaultdict(list)
        for r in results:
            if r.get("case") == "forward" and r["dtype"] == dtype and r.get("bytes"):
                lines[(r["kind"], r["impl"])].append((r["numel"], r["bytes"] / r["median_s"] / 1e9))
        for (kind, impl), pts in sorted(lines.items()):
            pts.sort()
            if kind == "ceiling":
                style = dict(color="black", linestyle="-" if impl == "sum" else "-.", linewidth=2)
                label = f"ceiling x.{impl}()"
            else:
                style = dict(
                    color=colors.get(kind), linestyle=styles.get(impl, "-"), marker="o", markersize=3
                )
                label = f"{kind} {impl}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="elements",
            ylabel="GB/s (input read once)",
            title=f"observer forward, {dtype}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    if searches:
        ax = axes[0][-1]
        labels, values, colors_ = [], [], []
        for r in sorted(searches, key=lambda r: (r["case"], r["bins"], r["impl"], r.get("method", ""))):
            if r["case"] == "kl-search":
                labels.append(f"KL {r['bins']}: {r['impl']}")
            else:
                labels.append(
                    f"qparams {r['bins']}: {r['impl']} {r.get('method', '')} {r.get('qscheme', '')}"
                )
            values.append(r["median_s"] * 1e3)
            colors_.append("tab:blue" if r["impl"].startswith("mono_quant") else "tab:orange")
        ax.barh(range(len(values)), values, color=colors_)
        ax.set_yticks(range(len(values)), labels, fontsize=6)
        ax.set(xscale="log", xlabel="median ms (log)", title="threshold search (blue: mono_quant)")
        ax.invert_yaxis()
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle(describe(machine), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="JSON written by pytest --benchmark-json")
    parser.add_argument("--md", help="write the markdown here (default: print it)")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--title", default="", help="heading of the markdown")
    parser.add_argument(
        "--sizes", help="comma-separated element counts kept in the observer tables, e.g. 1e6,3e7 (a summary)"
    )
    args = parser.parse_args(argv)
    try:
        sizes = None if args.sizes is None else {int(float(s)) for s in args.sizes.split(",") if s.strip()}
        machine, results = load(args.results)
    except (OSError, ValueError) as exc:
        print(f"report.py: {exc}", file=sys.stderr)
        return 2
    text = markdown(machine, results, args.title, sizes)
    if args.md:
        Path(args.md).write_text(text)
    else:
        print(text)
    if args.plot:
        plot(machine, results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
