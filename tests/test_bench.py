"""The benchmark tooling: ``mono_quant.bench`` (``mono-quant bench``), ``benchmarks/report.py`` and the
per-candidate loop baselines of ``benchmarks/entropy_loop.py``. Timings are not asserted, only what the
tools compute and print.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mono_quant import bench, timing
from mono_quant.core import search

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_prints_a_table_with_torch_ao_beside(capsys):
    args = [
        "--sizes",
        "2e3",
        "--dtypes",
        "float32",
        "--rounds",
        "1",
        "--min-time",
        "0",
        "--no-search",
        "--quiet",
    ]
    status = bench.main(args)
    out = capsys.readouterr().out
    assert status == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | impl |")
    body = table[1:]
    for kind in bench.KINDS:
        assert any(f"| {kind} | mono_quant torch | float32 | 2e+03 |" in line for line in body), kind
    if bench.torch_ao() is not None:
        assert sum("| torch.ao |" in line for line in body) == len(bench.KINDS)


def test_main_search_rows(capsys):
    status = bench.main(
        [
            "--sizes",
            "1e3",
            "--kinds",
            "minmax",
            "--dtypes",
            "bfloat16",
            "--rounds",
            "1",
            "--min-time",
            "0",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "calculate_qparams 2048 bins | mono_quant kl symmetric" in out
    assert "calculate_qparams 8192 bins | mono_quant percentile affine" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--sizes", "lots"],
        ["--sizes", "0"],
        ["--kinds", "nope"],
        ["--kinds", "auto"],
        ["--dtypes", "int8"],
        ["--rounds", "0"],
        ["--min-time", "-1"],
        ["--min-time", "nan"],
    ],
)
def test_main_rejects_bad_arguments(argv, capsys):
    assert bench.main([*argv, "--quiet"]) == 2
    assert "mono-quant bench:" in capsys.readouterr().err


def test_activation_shape_dtype_and_outliers():
    x = bench.activation(10_000, torch.bfloat16)
    assert x.shape == (10, bench.HIDDEN) and x.dtype == torch.bfloat16
    col_max = x.float().abs().amax(0)
    assert col_max[0] > 5 * col_max[1]  # channel 0 is an outlier channel
    assert torch.equal(bench.activation(10_000, seed=3), bench.activation(10_000, seed=3))


def test_peak_extra_bytes_sees_a_temporary_on_cpu():
    x = torch.ones(1 << 20)
    peak = timing.peak_extra_bytes(lambda: (x * 2).sum(), "cpu")
    assert peak >= x.nbytes
    assert timing.peak_extra_bytes(x.sum, "cpu") < x.nbytes


def test_registry_names_are_timed_on_their_forward(capsys):
    args = ["--sizes", "1e3", "--kinds", "kl,ema,HistogramObserver", "--dtypes", "float32", "--rounds", "1"]
    assert bench.main([*args, "--min-time", "0", "--no-search", "--quiet"]) == 0
    body = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    cases = {line.split(" | ")[0].strip("| ") for line in body}
    assert cases == {"kl", "moving_average", "histogram"}
    assert bench.mono_observer("kl").method == "kl" and bench.mono_observer("mse").method == "mse"


def _fake_clock(monkeypatch, step):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    return lambda: clock.__setitem__(0, clock[0] + step)


def test_time_calls_takes_rounds_and_a_time_budget(monkeypatch):
    call = _fake_clock(monkeypatch, 0.25)  # every call takes 0.25 s of the fake clock
    t = timing.time_calls(call, rounds=2, min_seconds=1.0, warmup=0)
    assert t.calls == 4 and t.median == 0.25 and t.spread == 0.0  # the budget, not the rounds, decided
    assert timing.time_calls(call, rounds=6, min_seconds=1.0, warmup=0).calls == 6
    assert timing.time_calls(call, rounds=1, min_seconds=100.0, warmup=0, max_calls=7).calls == 7


def test_rows_that_are_not_credible_are_flagged():
    def row(seconds, **kw):
        return bench.Row("minmax", "mono_quant torch", "float32", 1000, seconds, 4000, ceiling_s=1e-4, **kw)

    assert row(1e-4).flags() == [] and row(0.9e-4).flags() == []  # at or near the ceiling: fine
    fast = row(1e-6).flags()
    assert len(fast) == 1 and fast[0].startswith("NOT CREDIBLE: 10000% of the read ceiling")
    assert row(1e-4, spread=0.8).flags() == ["NOT CREDIBLE: calls spread 80% of the median"]
    assert row(1e-4, ceiling_spread=2.0).flags() == [
        "NOT CREDIBLE: the ceiling's calls spread 200% of its median"
    ]
    cells = row(1e-6, calls=9).cells()
    assert len(cells) == len(bench.HEADER) and cells[-2] == "9" and cells[-1].startswith("NOT CREDIBLE")
    search = bench.Row("calculate_qparams 2048 bins", "mono_quant kl", "float32", 1000, 1e-9)
    assert search.flags() == []  # no ceiling: nothing to compare with


def test_median_seconds_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds=0"):
        timing.median_seconds(lambda: None, rounds=0)


def test_loops_pick_the_vectorized_threshold():
    loops = _load("entropy_loop")
    gen = torch.Generator().manual_seed(0)
    for n in (1, 50, 300):
        h = torch.randint(0, 1000, (n,), generator=gen) * (torch.rand(n, generator=gen) > 0.2)
        h[min(1, n - 1)] += 1  # at least one count where the zero-bin rule copies from
        hz = torch.cat([h[1:2], h[1:]]) if n > 1 else h
        hi = search.symmetric_candidates(n, "cpu")
        scores = search.kl_divergences(hz, torch.zeros_like(hi), hi, 128)
        expected = int(hi[search.last_argmin(scores)])
        for loop in (loops.loop_numpy, loops.loop_python):
            threshold, divergences = loop(h.numpy(), 128)
            assert threshold == expected
            finite = np.isfinite(divergences)
            assert np.array_equal(finite, torch.isfinite(scores).numpy())
            np.testing.assert_allclose(divergences[finite], scores.numpy()[finite], rtol=1e-9, atol=1e-12)


def _fake_results(tmp_path: Path) -> Path:
    def entry(median, **info):
        return {"name": "x", "group": "g", "stats": {"median": median}, "extra_info": info}

    fwd = dict(case="forward", dtype="float32", numel=1000, bytes=4000, ceiling_sum_s=1e-6)
    data = {
        "machine_info": {"cpu_model": "Test CPU", "cpu_count": 2, "torch_threads": 2, "device": "cpu"},
        "benchmarks": [
            entry(1e-6, **fwd, kind="ceiling", impl="sum"),
            entry(2e-6, **fwd, kind="ceiling", impl="clone"),
            entry(4e-6, **fwd, kind="minmax", impl="mono_quant-torch", peak_extra_bytes=3000),
            entry(8e-6, **fwd, kind="minmax", impl="torch.ao"),
            entry(1e-3, case="kl-search", impl="mono_quant-vectorized", bins=2048, candidates=1921),
            entry(1e-1, case="kl-search", impl="loop-numpy", bins=2048, candidates=1921),
            entry(
                2e-3, case="calculate_qparams", impl="mono_quant", method="kl", qscheme="affine", bins=2048
            ),
            entry(
                4e-3,
                case="calculate_qparams",
                impl="torch.ao",
                method="non-linear",
                qscheme="affine",
                bins=2048,
            ),
            {"name": "disabled", "group": "g", "stats": None, "extra_info": {}},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_report_tables(tmp_path):
    report = _load("report")
    machine, results = report.load(_fake_results(tmp_path))
    text = report.markdown(machine, results, "t")
    assert "Test CPU (2 cores, 2 torch threads)" in text
    # mono 4 us, torch.ao 8 us, ceiling 1 us, 4000 bytes: 1 GB/s, 25% of the ceiling, 2x torch.ao
    assert "| minmax | float32 | 1e+03 | 0.004 | 1.00 | 25% | 3 KiB | 0.008 | 0.50 |  | 2.00x |" in text
    assert "| minmax |" not in report.markdown(machine, results, sizes={10})
    assert "| 2048 | 1921 | 1 | 100 | 100x | not run |  |" in text
    assert "| 2048 | kl | affine | 2 | 4 | 2.00x |" in text


def test_report_cli_writes_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report = _load("report")
    md, png = tmp_path / "out.md", tmp_path / "out.png"
    assert report.main([str(_fake_results(tmp_path)), "--md", str(md), "--plot", str(png)]) == 0
    assert "### Observer forward" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_other_json(tmp_path, capsys):
    report = _load("report")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert report.main([str(bad)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, on the +-inf fills
def test_gpu_bench_smoke_writes_every_case(tmp_path, capsys):
    # the GPU benchmark script's logic on CPU (interpreter, wall-clock timer): every case runs and is saved
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    gpu_bench = _load("gpu_bench")
    assert gpu_bench.main(["--smoke", "--sizes", "4096", "--strategies", "all", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    cases = {r["case"] for r in rows}
    want = {"minmax", "ema", "per_channel", "hist_atomic", "hist_tl_histogram", "hist_histc", "hist_torch",
            "ao_minmax", "ao_per_channel", "ao_histogram", "probe_histc", "probe_minmax_launcher",
            "read_ceiling_sum"}  # fmt: skip
    assert want <= cases
    assert len(rows) == 2 * len(cases) and all(r["ms"] > 0 for r in rows)  # fp32 and bf16, none failed
    assert "hist_atomic" in capsys.readouterr().out
    assert gpu_bench.main(["--report", str(tmp_path / "gpu_bench.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    table = [line.strip("| ").split(" | ") for line in out if line.startswith("| hist_atomic")]
    assert len(table) == 2 and all(cells[7].endswith("x") and cells[9].endswith("x") for cells in table)
    args = ["--smoke", "--sizes", "4400", "--data", "llm", "--strategies", "default,atomic,default"]
    assert gpu_bench.main([*args, "--out", str(tmp_path)]) == 0
    llm = json.loads((tmp_path / "gpu_bench-llm.json").read_text())
    assert llm["meta"]["data"] == "llm" and {r["n"] for r in llm["rows"]} == {4000}  # [4, 1000]
    hist = sorted(r["case"] for r in llm["rows"] if r["case"].startswith("hist_") and r["dtype"] == "float32")
    assert hist == sorted({"hist_torch", "hist_atomic", f"hist_{llm['meta']['default_hist_strategy']}"})
    with pytest.raises(SystemExit):
        gpu_bench.main(["--smoke", "--strategies", "smem", "--out", str(tmp_path)])
