"""Tables from the results of ``gpu_bench.py``: a results JSON as markdown (each Triton case beside torch.ao,
the torch path and ModelOpt measured on the same tensor in the same run) and the summary of issue 11's rows
from the JSONs of a ``gpu_check.sh`` run (``gpu_bench.py --report`` / ``--summary`` call these).
"""

from __future__ import annotations

import json
import os

BASELINES = {  # case -> (torch.ao case, mono_quant torch-path case, ModelOpt case) it is compared with
    "minmax": ("ao_minmax", "minmax_torch", "mo_max"),
    "ema": ("ao_minmax", "ema_torch", "mo_max"),
    "per_channel": ("ao_per_channel", "per_channel_torch", "mo_per_channel"),
}
HIST_BASELINES = ("ao_histogram", "hist_torch", "mo_histogram")  # of every hist_<strategy> case


def _baselines(case: str) -> tuple[str, str, str] | None:
    if case.startswith("hist_") and case != "hist_torch":
        return HIST_BASELINES
    for base, found in BASELINES.items():  # opt-in kernels (minmax_<kernel>) against the same baselines
        if case == base or (case.startswith(base + "_") and not case.endswith("_torch")):
            return found
    return None


def markdown(data: dict) -> str:
    """A results JSON of this script as a markdown table: the Triton cases beside torch.ao, the torch path
    and ModelOpt measured on the same tensor in the same run (ratios: baseline ms / Triton ms, above 1 is
    faster)."""
    meta, rows = data["meta"], data["rows"]
    ms = {(r["case"], r["dtype"], r["n"]): r["ms"] for r in rows}
    ratio = lambda base, t: f"{base / t:.2f}x" if base and t else ""
    cell = lambda t: f"{t:.3f}" if t else ""
    lines = [
        f"{meta['device']}, torch {meta['torch']}, triton {meta.get('triton')}, {meta['date']}; "
        f"{meta.get('data', 'randn')} data; median ms by triton.testing.do_bench; default: what a user "
        "gets without settings",
        "",
        "| observer | dtype | elements | Triton ms | GB/s | of x.sum() | torch.ao ms | vs torch.ao "
        "| torch path ms | vs torch path | ModelOpt ms | vs ModelOpt | default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if _baselines(r["case"]) is None:
            continue
        ao, torch_path, mo = (ms.get((c, r["dtype"], r["n"])) for c in _baselines(r["case"]))
        t = r["ms"]
        cells = [
            r["case"], r["dtype"], f"{r['n']:.0e}", f"{t:.3f}" if t else "fail", f"{r.get('GBps', 0):.0f}",
            f"{r['of_read_ceiling']:.0%}" if r.get("of_read_ceiling") else "",
            cell(ao), ratio(ao, t), cell(torch_path), ratio(torch_path, t), cell(mo), ratio(mo, t),
            "yes" if r.get("default") else "",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    others = [r for r in rows if r["case"].startswith(("probe_", "layers_", "host_"))]
    if others:
        lines += ["", "Many layers (ms per step of all), host time per call (ms), probes:", "",
                  "| case | dtype | elements | ms | GB/s | of x.sum() | default |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in others:
            t, frac = r["ms"], r.get("of_read_ceiling")
            cells = [r["case"], r["dtype"], f"{r['n']:.0e}", f"{t:.4f}" if t else "fail",
                     "" if r.get("host_time") else f"{r.get('GBps', 0):.0f}", f"{frac:.0%}" if frac else "",
                     "yes" if r.get("default") else ""]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- issue 11's rows ---------------------------------------------------------------------------------------
# (label, JSON, case prefix, dtype, n, baseline prefix for the opt-in variants, target)
ISSUE_ROWS = [
    *[(f"MinMax {d} {n:.0e}", "randn", "minmax", d, n, f">= {t} % of x.sum(), >= torch.ao")
      for d, ts in (("float32", (90, 95)), ("bfloat16", (85, 90))) for n, t in zip((1e8, 1e9), ts)],
    *[(f"EMA {d} {n:.0e}", "randn", "ema", d, n, f">= {t} % of x.sum()")
      for d, ts in (("float32", (90, 95)), ("bfloat16", (85, 90))) for n, t in zip((1e8, 1e9), ts)],
    *[(f"per-channel {d} {n:.0e}", "randn", "per_channel", d, n, ">= 85 % of x.sum()")
      for d in ("float32", "bfloat16") for n in (1e8, 1e9)],
    *[(f"histogram {d} {n:.0e}", "randn", "hist", d, n, t)
      for d, ts in (("float32", (">= 60 % of x.sum(), >= 5x torch.ao", ">= 70 % of x.sum()")),
                    ("bfloat16", (">= 50 % of x.sum()",) * 2)) for n, t in zip((1e8, 1e9), ts)],
    ("histogram LLM-like float32 1e8", "llm", "hist", "float32", 1e8, ">= 50 % of x.sum()"),
    *[(f"200 layers {k} {d}", "randn", f"layers_{k}", d, None, ">= 2x torch.ao")
      for k in ("minmax", "per_channel", "hist") for d in ("float32", "bfloat16")],
    *[(f"host time, 1e4 values, {k}", "randn", f"host_{k}", "float32", 1e4, "<= 0.015 ms")
      for k in ("minmax", "ema", "per_channel", "hist")],
]  # fmt: skip


def _issue_row(rows: list[dict], prefix: str, dtype: str, n) -> dict | None:
    """The default configuration's row, its best opt-in variant and its baselines, for one issue row."""
    mine = [r for r in rows if r["dtype"] == dtype and (n is None or abs(r["n"] - n) <= 0.01 * n)]
    kind = prefix.removeprefix("layers_").removeprefix("host_")
    scope = prefix[: len(prefix) - len(kind)]  # "", "layers_" or "host_"
    ours = [r for r in mine if r["case"].startswith(prefix) and not r["case"].endswith("_torch") and r["ms"]]
    if kind == "hist":
        ours = [r for r in ours if r["case"] != f"{scope}hist_torch"]
    default = next((r for r in ours if r.get("default")), None)
    if default is None:
        return None
    best = min(ours, key=lambda r: r["ms"])
    ao_case, _, mo_case = HIST_BASELINES if kind == "hist" else BASELINES[kind]
    find = lambda case: next((r["ms"] for r in mine if r["case"] == scope + case and r["ms"]), None)
    return {"default": default, "best": best, "ao": find(ao_case), "mo": find(mo_case)}


def summary(folder: str) -> int:
    """Print issue 11's rows from ``gpu_bench.json`` / ``gpu_bench-llm.json`` in ``folder`` (and the gate's
    verdict from ``gate.json``), and write them to ``gpu_check.md`` there."""
    data = {}
    for key, name in (("randn", "gpu_bench.json"), ("llm", "gpu_bench-llm.json")):
        try:
            with open(os.path.join(folder, name)) as f:
                data[key] = json.load(f)
        except (OSError, ValueError):
            data[key] = {"meta": {}, "rows": []}
    meta = data["randn"]["meta"] or data["llm"]["meta"]
    lines = [f"{meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
             f"{meta.get('date')}: issue 11's rows, medians in ms (host time: ms per call); 'best' is the "
             "fastest configuration measured, default or opt-in", "",
             "| row | default ms | of x.sum() | best (opt-in) ms | best of x.sum() | vs torch.ao "
             "| vs ModelOpt | target |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    try:
        with open(os.path.join(folder, "gate.json")) as f:
            gate = json.load(f)
        lines.insert(1, f"\nExactness gate: {len(gate['results']) - gate['failed']}/{len(gate['results'])} "
                        "cases bit-identical to the torch path.")  # fmt: skip
    except (OSError, ValueError, KeyError):
        lines.insert(1, "\nExactness gate: no gate.json.")
    pct = lambda r: f"{r['of_read_ceiling']:.0%}" if r.get("of_read_ceiling") else ""
    ratio = lambda base, t: f"{base / t:.2f}x" if base and t else ""
    for label, key, prefix, dtype, n, target in ISSUE_ROWS:
        rows = data[key]["rows"]
        if data[key]["meta"].get("smoke") and n in (1e8, 1e9):  # tiny sizes: the smallest and the largest
            sizes = sorted({r["n"] for r in rows if not r["case"].startswith(("layers_", "host_"))})
            n = (sizes[0] if n == 1e8 else sizes[-1]) if sizes else n
        got = _issue_row(rows, prefix, dtype, n)
        if got is None:
            lines.append(f"| {label} | not measured |  |  |  |  |  | {target} |")
            continue
        d, b = got["default"], got["best"]
        best = f"{b['ms']:.4f} ({b['case']})" if b is not d else "(the default)"
        lines.append(f"| {label} | {d['ms']:.4f} | {pct(d)} | {best} | {pct(b) if b is not d else ''} | "
                     f"{ratio(got['ao'], d['ms'])} | {ratio(got['mo'], d['ms'])} | {target} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0
