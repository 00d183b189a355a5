"""The ``mono-quant`` command: the demo and a user model in a subprocess, argument errors in-process.

Subprocesses cost about two seconds each (the torch import), so only two run: the demo with every output
file, and a user model given by import path. Everything else calls ``mono_quant.cli.main`` directly.
"""

import importlib.machinery
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import mono_quant
from mono_quant import cli, demo, report

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are small: one thread is as fast, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(args, cwd, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "mono_quant.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- end to end, in a subprocess ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo with 2 calibration batches, writing qparams, observer state and the plot."""
    d = tmp_path_factory.mktemp("demo")
    proc = _run(
        ["calibrate", "--batches", "2", "--save", "q.json", "--save-state", "s.pt", "--plot", "p.png"], d
    )
    return proc, d


def test_demo_prints_the_table(demo_run):
    proc, _ = demo_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar: stderr is not a terminal
    lines = proc.stdout.strip().splitlines()
    for layer in (
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.1.mlp.fc",
        "blocks.1.mlp.proj",
        "lm_head",
    ):
        assert any(line.startswith(layer) for line in lines), layer
    table = proc.stdout.split("\n\n")[1]  # header lines, table, summary
    for kind in report.OBSERVER_KINDS:
        assert table.count(f" {kind} ") == 9, kind  # one row per layer
    assert table.count("*") == 9  # one best per layer
    assert lines[-1].startswith("winner: ") and "of 9 layers" in lines[-1]


def test_demo_saved_qparams_match_an_in_process_run_and_the_saved_state(demo_run):
    proc, d = demo_run
    assert proc.returncode == 0, proc.stderr
    saved = report.load_qparams(str(d / "q.json"))
    raw = json.loads((d / "q.json").read_text())
    assert raw["dtype"] == "int8" and raw["qscheme"] == "affine" and raw["calibration_batches"] == 2
    entry = raw["layers"]["lm_head"]["observers"]["percentile"]
    assert entry["observer"] == "HistogramObserver"
    assert entry["settings"]["method"] == "percentile" and entry["settings"]["bins"] == 2048

    # the same comparison in this process gives the same qparams, bit for bit (three kinds, for time)
    batches = demo.demo_batches(3)
    cmp = report.compare_observers(
        demo.demo_model(), batches[:2], batches[2], ("minmax", "kl", "per_channel")
    )
    assert set(saved) == set(cmp.scores)
    for layer, row in cmp.scores.items():
        for kind, s in row.items():
            scale, zp = saved[layer][kind]
            assert torch.equal(scale, s.scale.float()), (layer, kind)
            assert torch.equal(zp, s.zero_point.to(torch.int32)), (layer, kind)
            want_db = raw["layers"][layer]["observers"][kind]["sqnr_db"]
            assert want_db == pytest.approx(s.sqnr_db, rel=1e-12)
    assert {raw["layers"][layer]["best"] for layer in raw["layers"]} <= set(report.OBSERVER_KINDS)

    # fresh observers loaded from --save-state give the same qparams
    loaded = report.load_state(str(d / "s.pt"))
    assert set(loaded) == set(report.OBSERVER_KINDS)
    for kind, layers in loaded.items():
        for layer, obs in layers.items():
            scale, zp = obs.calculate_qparams()
            assert torch.equal(scale, saved[layer][kind][0]) and torch.equal(zp, saved[layer][kind][1])
    assert loaded["per_channel"]["lm_head"].ch_axis == -1


def test_demo_saved_state_continues_calibration_exactly(demo_run):
    _, d = demo_run
    loaded = report.load_state(str(d / "s.pt"))
    model, batches = demo.demo_model(), demo.demo_batches(4)
    layer = "blocks.0.mlp.proj"
    inputs = [report.capture_inputs(model, batches[i])[layer] for i in (0, 1, 3)]
    for kind in ("minmax", "kl", "per_channel"):
        resumed = loaded[kind][layer]
        resumed(inputs[2])  # one more batch on top of the saved two
        fresh = report.make_observer(kind, torch.int8, "affine", torch.nn.Linear(1, 1))
        for x in inputs:
            fresh(x)
        for a, b in zip(resumed.calculate_qparams(), fresh.calculate_qparams(), strict=True):
            assert torch.equal(a, b), kind
        for name, buf in fresh.named_buffers():  # histogram counts and grid too: the same state exactly
            assert torch.equal(buf, getattr(resumed, name)), (kind, name)


def test_demo_plot_is_a_readable_png(demo_run):
    _, d = demo_run
    png = d / "p.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    image = plt.imread(str(png))
    height, width = image.shape[:2]
    assert height >= 300 and width >= 600  # 3 x 3 panels


def test_user_model_by_import_path(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save([torch.randn(5, 8, generator=g) for _ in range(4)], tmp_path / "batches.pt")
    proc = _run(
        [
            "calibrate",
            "--model",
            "cli_models:mlp",
            "--data",
            "batches.pt",
            "--observer",
            "minmax,mse",
            "--quiet",
        ],
        tmp_path,
        {"PYTHONPATH": str(TESTS)},
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["0", "minmax"] == rows[2][:2] and rows[3][0] == "mse"  # layers of nn.Sequential: "0" and "2"
    assert ["2", "minmax"] == rows[4][:2]
    assert proc.stdout.strip().splitlines()[-1].startswith("winner: ")


# --- in-process runs -------------------------------------------------------------------------------------


@pytest.fixture
def models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def test_sqnr_in_saved_qparams_is_the_hand_computed_value(tmp_path, capsys, models_on_path):
    # uint8 affine from the range [0, 2.55]: scale 0.01, zero point 0. Held out: 1.0 and 2.0 sit on the
    # grid (to float32 rounding), 3.55 clips to 2.55: signal 1 + 4 + 3.55^2, noise 1.0
    calib = torch.tensor([[0.0, 0.5, 1.0, 2.55]])
    held = torch.tensor([[1.0, 2.0, 3.55, 0.0]])
    torch.save([calib, held], tmp_path / "d.pt")
    code, _, err = _main(
        capsys,
        *("calibrate", "--model", "cli_models:linear", "--data", str(tmp_path / "d.pt"), "--quiet"),
        *("--observer", "minmax", "--dtype", "uint8", "--save", str(tmp_path / "q.json")),
    )
    assert code == 0, err
    entry = json.loads((tmp_path / "q.json").read_text())["layers"][""]["observers"]["minmax"]
    assert entry["scale"] == pytest.approx(0.01) and entry["zero_point"] == 0
    assert entry["sqnr_db"] == pytest.approx(10 * math.log10((1 + 4 + 3.55**2) / 1.0), rel=1e-6)


def test_dict_batches_and_example_inputs(tmp_path, capsys, models_on_path):
    torch.save([{"features": torch.randn(3, 8)} for _ in range(3)], tmp_path / "d.pt")
    code, out, err = _main(
        capsys, "calibrate", "--model", "cli_models:KeywordModel", "--data", str(tmp_path / "d.pt"), "--quiet"
    )
    assert code == 0, err
    assert out.splitlines()[2].split()[:2] == ["proj", "minmax"]
    code, out, err = _main(capsys, "calibrate", "--model", "cli_models:WithExamples", "--batches", "2")
    assert code == 0, err
    assert "2 batches from example_inputs()" in out and out.splitlines()[-1].startswith("winner: ")


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(capsys, monkeypatch, models_on_path):
    args = ("calibrate", "--model", "cli_models:WithExamples", "--batches", "2", "--observer", "minmax")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = _main(capsys, *args)
    assert code == 0 and "calibrating" in err and "/2 " in err  # tqdm knows the total
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = _main(capsys, *args, "--quiet")
    assert code == 0 and err == ""


def test_version_and_help(capsys):
    code, out, _ = _main(capsys, "--version")
    assert code == 0 and out.strip() == f"mono-quant {mono_quant.__version__}"
    code, out, _ = _main(capsys, "calibrate", "--help")
    assert code == 0 and "examples:" in out and "mono-quant calibrate --model" in out
    for kind in report.OBSERVER_KINDS:
        assert kind in out


def _bad_data(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "dict.pt")
    (tmp_path / "junk.pt").write_text("not a torch file")
    torch.save([torch.zeros(2, 8), torch.zeros(2, 8)], tmp_path / "two.pt")
    torch.save([torch.zeros(2, 5), torch.zeros(2, 5)], tmp_path / "wrong_width.pt")
    return tmp_path


BAD_ARGS = [
    (["calibrate", "--observer", "minmax,foo"], "unknown observer 'foo'; choose from minmax, moving_average"),
    (["calibrate", "--dtype", "int16"], "invalid choice: 'int16' (choose from"),
    (["calibrate", "--qscheme", "asym"], "argument --qscheme: invalid choice: 'asym'"),
    (["calibrate", "--batches", "0"], "argument --batches: expected a positive integer, got '0'"),
    (["calibrate", "--batches", "many"], "expected a positive integer, got 'many'"),
    (["calibrate", "--device", "cuda:99"], "--device cuda:99"),
    (["calibrate", "--device", "banana"], "is not a device name; use auto, cpu, cuda, cuda:N or mps"),
    (["calibrate", "--device", "meta"], "device type 'meta' is not supported"),
    (["calibrate", "--model", "no_colon"], "expected package.module:factory"),
    (["calibrate", "--model", "no_such_pkg_xyz.mod:f"], "cannot import 'no_such_pkg_xyz.mod'"),
    (["calibrate", "--model", "cli_models:missing"], "'cli_models' has no attribute 'missing'"),
    (["calibrate", "--model", "cli_models:NOT_CALLABLE"], "is a int, expected a callable"),
    (
        ["calibrate", "--model", "cli_models:not_a_module"],
        "not_a_module() returned a str, expected a torch.nn.Module",
    ),
    (["calibrate", "--model", "cli_models:broken"], "broken() raised OSError: weights not found"),
    (["calibrate", "--model", "cli_models:mlp"], "no calibration data; pass --data FILE.pt"),
    (["calibrate", "--data", "{tmp}/missing.pt"], "missing.pt: no such file"),
    (["calibrate", "--data", "{tmp}/junk.pt"], "torch.load(weights_only=True) cannot read it"),
    (["calibrate", "--data", "{tmp}/dict.pt"], "holds a dict; expected a tensor, a list of tensors"),
    (["calibrate", "--model", "cli_models:mlp", "--data", "{tmp}/two.pt", "--batches", "5"], "at most 1 for"),
    (["calibrate", "--model", "cli_models:mlp", "--data", "{tmp}/wrong_width.pt"], "failed on batch 0"),
    (["calibrate", "--save", "{tmp}/no/such/dir/q.json"], "does not exist"),
    (["calibrate", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "choose a command: calibrate or bench"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGS])
def test_bad_arguments_give_one_line_and_exit_2(args, message, tmp_path, capsys, models_on_path):
    _bad_data(tmp_path)
    code, out, err = _main(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and message in lines[0]
    assert lines[0].startswith("mono-quant")


def test_plot_without_matplotlib_is_one_line(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a)
    )
    code, _, err = _main(capsys, "calibrate", "--plot", "out.png")
    assert code == 2
    assert err.strip() == "mono-quant calibrate: error: --plot needs matplotlib, which is not installed: " + (
        "pip install 'mono_quant[plot]'"
    )


def test_bench_delegates_to_mono_quant_bench(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("mono_quant.bench")
    fake.__spec__ = importlib.machinery.ModuleSpec("mono_quant.bench", None)
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "mono_quant.bench", fake)
    monkeypatch.setattr(mono_quant, "bench", fake, raising=False)
    assert cli.main(["bench", "--size", "1e6"]) == 7
    assert seen == [["--size", "1e6"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "x"], "argument --rounds: invalid int value: 'x'"),
        (["--sizes", "0"], "bad --sizes '0'"),
        (["--unknown"], "unrecognized arguments: --unknown"),
    ],
)
def test_bench_bad_arguments_are_one_line(capsys, args, message):
    code, out, err = _main(capsys, "bench", *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_bench_help_returns_zero(capsys):
    code, out, _ = _main(capsys, "bench", "--help")
    assert code == 0 and "--sizes" in out
