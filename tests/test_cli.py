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
from mono_quant import cli, cli_inputs, demo, report
from mono_quant import compare as cli_compare
from mono_quant.args import observer_kind


def compare_make(name):
    return cli_compare.make_observer(name, torch.int8, None, torch.nn.Linear(1, 1))


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
        cli_inputs.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a)
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


# --- outputs: checked before calibrating, written so that a failure destroys nothing (issue 12, 9 and 11) --


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if the command gets as far as calibrating."""

    def calibrated(*args, **kwargs):
        raise AssertionError("the command calibrated before finding that an output cannot be written")

    monkeypatch.setattr(cli_compare, "compare_observers", calibrated)


MINI = (
    "calibrate",
    "--model",
    "cli_models:WithExamples",
    "--batches",
    "1",
    "--observer",
    "minmax",
    "--quiet",
)

UNWRITABLE = [
    ("--save", "/sys/q.json", "cannot create a file there"),
    ("--save-state", "/sys/s.pt", "cannot create a file there"),
    ("--plot", "/sys/p.png", "cannot create a file there"),
    ("--save", "/proc/q.json", "cannot create a file there"),
    ("--save", "{tmp}/" + "a" * 300 + ".json", "cannot create a file there (File name too long)"),
    ("--save", "{tmp}", "is a folder; give a file name"),
    ("--plot", "{tmp}/p.xyz", "matplotlib cannot write .xyz files; end the name with one of: "),
]


@pytest.mark.parametrize(
    ("flag", "path", "message"), UNWRITABLE, ids=[f"{f} {p[:20]}" for f, p, _ in UNWRITABLE]
)
def test_an_output_that_cannot_be_written_stops_before_calibrating(
    flag, path, message, tmp_path, capsys, models_on_path, no_calibration
):
    path = path.replace("{tmp}", str(tmp_path))
    if path.startswith(("/sys", "/proc")) and not os.path.isdir(os.path.dirname(path)):
        pytest.skip(f"no {os.path.dirname(path)} here")
    code, out, err = _main(capsys, *MINI, flag, path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mono-quant calibrate: error: {flag} {path}") and message in err
    assert sorted(os.listdir(tmp_path)) == []  # the checks left nothing behind


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("flag", ["--save", "--save-state"])
def test_a_write_that_fails_late_is_one_line_and_exit_2(flag, tmp_path, capsys, models_on_path):
    other = "--save-state" if flag == "--save" else "--save"
    code, out, err = _main(capsys, *MINI, flag, "/dev/full", other, str(tmp_path / "other"))
    assert code == 2
    assert (
        err == f"mono-quant calibrate: error: {flag} /dev/full: cannot write it (No space left on device)\n"
    )
    assert out.strip().splitlines()[-1].startswith("winner: ")  # the result is still shown
    assert (tmp_path / "other").stat().st_size > 0  # and the other output written


def test_an_existing_output_survives_a_failed_run(tmp_path, capsys, models_on_path):
    _bad_data(tmp_path)
    keep = tmp_path / "q.json"
    keep.write_text("keep me")
    code, _, err = _main(
        capsys, "calibrate", "--model", "cli_models:mlp", "--data", str(tmp_path / "wrong_width.pt"),
        "--save", str(keep), "--save-state", str(tmp_path / "s.pt"),
    )  # fmt: skip
    assert code == 2 and "failed on batch 0" in err
    assert keep.read_text() == "keep me" and not (tmp_path / "s.pt").exists()


def _same_file_cases(tmp_path):
    data = tmp_path / "data.pt"
    torch.save([torch.randn(4, 8), torch.randn(4, 8)], data)
    (tmp_path / "link.pt").symlink_to(data)
    os.link(data, tmp_path / "hard.pt")
    return data


SAME_FILE = [
    (["--save", "{tmp}/data.pt"], "--save {tmp}/data.pt is the same file as --data"),
    (["--save-state", "{tmp}/link.pt"], "--save-state {tmp}/link.pt is the same file as --data"),
    (["--plot", "{tmp}/hard.pt"], "--plot {tmp}/hard.pt is the same file as --data"),
    (["--save", "{tmp}/q.json", "--save-state", "{tmp}/./q.json"], "is the same file as --save {tmp}/q.json"),
    (["--save", "{tmp}/q.json", "--plot", "{tmp}/q.json"], "--plot {tmp}/q.json is the same file as --save"),
]


@pytest.mark.parametrize(("args", "message"), SAME_FILE)
def test_outputs_may_not_name_the_data_or_each_other(
    args, message, tmp_path, capsys, models_on_path, no_calibration
):
    data = _same_file_cases(tmp_path)
    before = data.read_bytes()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = _main(capsys, "calibrate", "--model", "cli_models:mlp", "--data", str(data), *args)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert data.read_bytes() == before


def test_saved_qparams_are_strict_json(tmp_path, capsys, models_on_path):
    # held out exactly on the grid: SQNR inf, which JSON cannot hold as a number
    torch.save(
        [torch.tensor([[0.0, 0.5, 1.0, 2.55]]), torch.tensor([[0.0, 0.01, 1.0, 2.55]])], tmp_path / "d.pt"
    )
    code, _, err = _main(
        capsys, "calibrate", "--model", "cli_models:linear", "--data", str(tmp_path / "d.pt"), "--quiet",
        "--observer", "minmax", "--dtype", "uint8", "--save", str(tmp_path / "q.json"),
    )  # fmt: skip
    assert code == 0, err

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    doc = json.loads((tmp_path / "q.json").read_text(), parse_constant=no_constants)
    assert doc["layers"][""]["observers"]["minmax"]["sqnr_db"] == "inf"
    assert set(report.load_qparams(str(tmp_path / "q.json"))) == {""}


# --- threads, pipes, endless generators ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["100000", "99999999999999999999", "0", "-1", "two", str(os.cpu_count() + 1)]
)
def test_threads_is_bounded_by_the_cpu_count(value, capsys, no_calibration):
    code, out, err = _main(capsys, "calibrate", "--threads", value)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert (
        f"argument --threads: expected an integer from 1 to {os.cpu_count()} (the CPUs of this machine)"
        in err
    )


def test_the_default_threads_leave_busy_cpus_alone(monkeypatch):
    args = types.SimpleNamespace(model="m:f", threads=None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for idle, want in ((None, 8), (8.0, 8), (5.4, 5), (0.2, 1), (20.0, 8)):
        monkeypatch.setattr(cli_inputs, "idle_cpus", lambda idle=idle: idle)
        assert cli_inputs.default_threads(args) == want, idle
    assert cli_inputs.default_threads(types.SimpleNamespace(model=None, threads=None)) == 1  # the demo
    idle = cli_inputs.idle_cpus(0.01)
    assert idle is None or 0 <= idle <= os.cpu_count()


def test_a_closed_stdout_ends_quietly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mono_quant.cli", *MINI[:-1]],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(TESTS)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # as `| head` does once it has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.EXIT_BROKEN_PIPE == 141
    assert err == ""  # no traceback, no "Exception ignored"


def test_an_endless_example_inputs_is_read_only_as_far_as_needed(capsys, models_on_path):
    code, out, err = _main(capsys, "calibrate", "--model", "cli_models:EndlessExamples", "--batches", "2")
    assert code == 0, err
    assert "2 batches from example_inputs() + 1 held out" in out


# --- models and data of real libraries (issue 12, item 21) ----------------------------------------------


def test_dict_batches_reach_a_forward_that_takes_one_dict(tmp_path, capsys, models_on_path):
    import cli_models

    batches = list(cli_models.tiny_sentence_encoder().example_inputs(3))
    torch.save(batches, tmp_path / "enc.pt")
    code, out, err = _main(
        capsys, "calibrate", "--model", "cli_models:tiny_sentence_encoder",
        "--data", str(tmp_path / "enc.pt"), "--observer", "minmax,per_channel", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].split()[:2] == ["0.model.encoder.layer.0.attention.self.query", "minmax"]
    assert lines[2].index("minmax") == lines[0].index("observer")  # the column fits the long name


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        ("BatchEncoding", "holds a tokenizer's BatchEncoding (cli_models.BatchEncoding), which "
         "torch.load(weights_only=True) does not load (unpickling it could run code); "
         "save dict(enc) instead"),
        ("DictLike", "holds cli_models.DictLike objects, which torch.load(weights_only=True) does not load"),
    ],
)  # fmt: skip
def test_data_with_classes_weights_only_refuses_is_one_clear_line(
    cls, message, tmp_path, capsys, models_on_path
):
    import cli_models

    batch = getattr(cli_models, cls)(input_ids=torch.zeros(2, 4, dtype=torch.int64))
    torch.save([batch, batch], tmp_path / "enc.pt")
    code, out, err = _main(
        capsys, "calibrate", "--model", "cli_models:mlp", "--data", str(tmp_path / "enc.pt")
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "\x1b" not in err and message in err


# --- the table when nothing can be measured (issue 12, item 19) -----------------------------------------


def test_an_all_nan_held_out_batch_names_no_winner(tmp_path, capsys, models_on_path):
    torch.save([torch.randn(3, 4), torch.full((3, 4), float("nan"))], tmp_path / "d.pt")
    code, out, err = _main(
        capsys, "calibrate", "--model", "cli_models:linear", "--data", str(tmp_path / "d.pt"), "--quiet",
        "--save", str(tmp_path / "q.json"),
    )  # fmt: skip
    assert code == 0, err
    rows = [line for line in out.split("\n\n")[0].splitlines()[2:] if not line.startswith("n/a:")]
    assert len(rows) == len(report.OBSERVER_KINDS) and all(" n/a " in row for row in rows)
    assert "inf" not in out and "*" not in out
    assert out.strip().splitlines()[-1].endswith(": no winner")
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["layers"][""]["best"] is None
    assert all(e["sqnr_db"] is None for e in doc["layers"][""]["observers"].values())


# --- one set of observer names (issue 12, item 27) ------------------------------------------------------


def _listed_names(text: str) -> set[str]:
    """The names of a '<names> (aliases: <aliases>; ...' list."""
    names, _, rest = text.partition(" (aliases: ")
    aliases = rest.partition(";")[0]
    return {n.strip() for n in (names + "," + aliases).split(",") if n.strip()}


def test_calibrate_bench_and_create_observer_take_the_same_names(capsys):
    from mono_quant import bench
    from mono_quant.core.registry import ALIASES, OBSERVERS

    registry = set(OBSERVERS) | set(ALIASES)
    _, help_text, _ = _main(capsys, "calibrate", "--help")
    listed = " ".join(help_text.split("all names:")[1].split("work too")[0].split())
    assert _listed_names(listed) == registry
    _, bench_help, _ = _main(capsys, "bench", "--help")
    assert _listed_names(" ".join(bench_help.split("names:")[1].split())) == registry
    _, _, err = _main(capsys, "calibrate", "--observer", "nope")
    _, _, bench_err = _main(capsys, "bench", "--kinds", "nope")
    for text in (err, bench_err):
        assert _listed_names(text.split("choose from ")[1]) == registry
    for name in sorted(registry):
        expected = type(mono_quant.create_observer(name))
        assert cli_inputs.observer_kinds(name) == [observer_kind(name)]
        if observer_kind(name) == "per_block":  # block scales: the comparison refuses it, in one line
            with pytest.raises(ValueError, match="gives block scales"):
                compare_make(name)
        else:
            assert type(compare_make(name)) is expected, name
        assert type(bench.mono_observer(name)) is expected, name
        no_counterpart = ("amax_history", "per_block", "channel_stats")  # torch.ao has none of these
        counterpart = observer_kind(name) not in no_counterpart
        assert (bench.torch_ao_observer(name) is not None) == counterpart or bench.torch_ao() is None
    assert set(report.OBSERVER_KINDS) <= set(OBSERVERS)  # what "all" compares


# --- FP8 targets through the command --------------------------------------------------------------------


def test_fp8_calibration_is_symmetric_and_saves_fp8_max(tmp_path, capsys):
    from mono_quant import io

    out = tmp_path / "q.json"
    code, text, err = _main(
        capsys, "calibrate", "--dtype", "fp8_e4m3", "--observer", "minmax,amax_history,per_channel",
        "--batches", "2", "--save", str(out), "--save-state", str(tmp_path / "s.pt"), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["dtype"] == "float8_e4m3fn" and doc["qscheme"] == "symmetric" and doc["fp8_max"] == 448.0
    assert "qmin" not in doc
    entry = next(iter(doc["layers"].values()))["observers"]["minmax"]
    lo, hi = entry["range"]
    assert lo == -hi and math.isclose(hi, 448.0 * entry["scale"], rel_tol=1e-6)
    loaded = io.load_qparams(str(out))
    assert all(int(zp.abs().max()) == 0 for row in loaded.values() for _, zp in row.values())
    state = io.load_state(str(tmp_path / "s.pt"))
    assert state["amax_history"] and next(iter(state["minmax"].values())).dtype == torch.float8_e4m3fn


def test_affine_fp8_is_one_line_before_calibrating(capsys):
    code, _, err = _main(
        capsys, "calibrate", "--dtype", "fp8_e5m2", "--qscheme", "affine", "--observer", "minmax"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--observer minmax with --dtype fp8_e5m2" in err and "affine" in err
