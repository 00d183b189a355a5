"""The GPU machine's scripts, checked on the CPU: ``benchmarks/gpu_check.sh`` parses, its exactness gate
(``benchmarks/gpu_gate.py``) runs under the interpreter and fails when a kernel and the torch path differ,
and ``gpu_bench.py --summary`` turns results into issue 11's rows.

The whole script's smoke run (``SMOKE=1 bash benchmarks/gpu_check.sh``, about a minute) is not part of
the suite; these keep its pieces from rotting.
"""

import importlib.util
import json
import pathlib
import subprocess

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_parses_and_names_every_step():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    text = (BENCH / "gpu_check.sh").read_text()
    for step in ("gate", "tests", "bench", "llm", "summary"):
        assert f"has {step}" in text


def test_segments_bench_times_every_kind_beside_one_observer_per_expert(tmp_path, capsys):
    bench = _load("segments_bench")
    out = tmp_path / "segments.json"
    argv = ["--device", "cpu", "--tokens", "40", "--hidden", "8", "--configs", "4x2,3x1", "--min-seconds=0"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    for kind in bench.KINDS:
        for routing in ("E=4 top-2", "E=3 top-1"):
            seg, loop = rows[f"{kind}, {routing}, segmented"], rows[f"{kind}, {routing}, per expert"]
            assert seg["ms"] > 0 and loop["speedup"] == 1.0
            assert seg["speedup"] == pytest.approx(loop["ms"] / seg["ms"])
    assert "| minmax, E=4 top-2, segmented |" in capsys.readouterr().out


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
def test_gate_passes_and_catches_a_difference(tmp_path, monkeypatch):
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    from mono_quant import reference

    gate = _load("gpu_gate")
    args = ["--smoke", "--out", str(tmp_path), "--dtypes", "float32", "--only", "minmax[two_launch],histc"]
    assert gate.main(args) == 0
    results = json.loads((tmp_path / "gate.json").read_text())["results"]
    assert {r["kernel"].split("[")[0] for r in results} == {"minmax", "histogram"} and all(
        r["ok"] for r in results
    )
    assert any("nan/inf" in r["case"] for r in results) and any("per channel" in r["case"] for r in results)

    def off_by_one(x, state):  # a torch path that miscounts one batch size
        histogram_update_(x, state)
        if x.numel() == 7:
            state.counts[0] += 1

    histogram_update_ = reference.histogram_update_
    monkeypatch.setattr(reference, "histogram_update_", off_by_one)
    assert gate.main([*args[:-1], "histc"]) == 1
    failed = [r for r in json.loads((tmp_path / "gate.json").read_text())["results"] if not r["ok"]]
    assert [r["case"] for r in failed] == ["sizes around the tile"]


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
def test_gate_checks_the_segmented_kernels(tmp_path, monkeypatch):
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    from mono_quant import reference_segments

    gate = _load("gpu_gate")
    args = ["--smoke", "--out", str(tmp_path), "--dtypes", "float32", "--only", "segments"]
    assert gate.main(args) == 0
    results = json.loads((tmp_path / "gate.json").read_text())["results"]
    assert len(results) == 10 and all(r["ok"] and r["kernel"] == "segments" for r in results)
    kinds = {r["case"].split(",")[0] for r in results}
    assert kinds == {"min/max per tensor", "min/max per channel", "histogram"}

    def one_more(x, segments, state, tokens_seen, invalid, *, mask=None):  # a twin that miscounts
        histogram_segments_update_(x, segments, state, tokens_seen, invalid, mask=mask)
        state.counts[0, 0] += 1

    histogram_segments_update_ = reference_segments.histogram_segments_update_
    monkeypatch.setattr(reference_segments, "histogram_segments_update_", one_more)
    assert gate.main(args) == 1
    failed = [r["case"] for r in json.loads((tmp_path / "gate.json").read_text())["results"] if not r["ok"]]
    assert failed == ["histogram, top-1", "histogram, top-2"]


def _row(case, n, ms, dtype="float32", **kw):
    return {"case": case, "n": n, "dtype": dtype, "ms": ms, **kw}


def test_summary_reports_the_default_the_best_and_the_baselines(tmp_path, capsys):
    bench = _load("gpu_bench")
    rows = [
        _row("read_ceiling_sum", 100_000_000, 0.12),
        _row("minmax", 100_000_000, 0.15, default=True, of_read_ceiling=0.8),
        _row("minmax_fast", 100_000_000, 0.125, default=False, of_read_ceiling=0.96),
        _row("minmax_torch", 100_000_000, 4.0, default=False),
        _row("ao_minmax", 100_000_000, 0.13),
        _row("mo_max", 100_000_000, 0.6),
        _row("layers_minmax", 200 * 2048 * 4096, 8.0, "bfloat16", default=True),
        _row("layers_ao_minmax", 200 * 2048 * 4096, 11.0, "bfloat16"),
    ]
    meta = {"device": "GPU", "torch": torch.__version__, "triton": "3.6.0", "date": "today"}
    (tmp_path / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (tmp_path / "gate.json").write_text(json.dumps({"failed": 1, "results": [{}, {}, {}]}))
    assert bench.main(["--summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "gpu_check.md").read_text()
    assert "2/3 cases bit-identical" in out
    line = next(x for x in out.splitlines() if x.startswith("| MinMax float32 1e+08"))
    assert line.split(" | ")[1:7] == ["0.1500", "80%", "0.1250 (minmax_fast)", "96%", "0.87x", "4.00x"]
    layers = next(x for x in out.splitlines() if x.startswith("| 200 layers minmax bfloat16"))
    assert "1.38x" in layers
    assert "| MinMax float32 1e+09 | not measured" in out
