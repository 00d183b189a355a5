"""``mono-quant calibrate --export FORMAT:PATH``: the files written, and the mistakes refused before any
calibration (one line on stderr, exit code 2, no file written)."""

import json

import pytest
import torch
from test_export import parse_tensorrt_cache

from mono_quant import cli, demo


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_format_in_one_run(capsys, tmp_path):
    cache, st, js = tmp_path / "c.cache", tmp_path / "s.safetensors", tmp_path / "q.json"
    code, out, err = _main(
        capsys,
        *("calibrate", "--batches", "2", "--observer", "minmax,mse,per_channel", "--qscheme", "symmetric"),
        *("--export", f"tensorrt:{cache}", "--export", f"safetensors:{st}", "--export", f"json:{js}"),
    )
    assert code == 0, err
    assert f"wrote tensorrt export to {cache} (9 layers; observers: " in out
    names = [name for name, m in demo.demo_model().named_modules() if isinstance(m, torch.nn.Linear)]
    header, scales = parse_tensorrt_cache(cache.read_text())
    assert header.endswith("-EntropyCalibration2") and list(scales) == names
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(st), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor(f"{names[0]}.weight_scale").shape[1] == 1
    assert keys == {f"{n}.{k}" for n in names for k in ("input_scale", "weight_scale")}
    observers = json.loads(meta["quantization"])["observers"]
    assert set(observers) == set(names) and set(observers.values()) <= {"minmax", "mse"}
    doc = json.loads(js.read_text())
    assert list(doc["layers"]) == names and set(doc["layers"][names[0]]["observers"]) == {
        "minmax",
        "mse",
        "per_channel",
    }


def test_named_observer(capsys, tmp_path):
    cache = tmp_path / "c.cache"
    code, out, err = _main(
        capsys,
        *("calibrate", "--batches", "1", "--observer", "minmax,kl", "--qscheme", "symmetric"),
        *("--export", f"tensorrt:{cache}", "--export-observer", "KL"),
    )
    assert code == 0, err
    assert "(9 layers; observers: kl)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--export", "onnx:x.onnx"], "--export onnx:x.onnx: format 'onnx' is not one of tensorrt, safe"),
        (["--export", "x.cache"], "--export 'x.cache': expected FORMAT:PATH"),
        (["--export", "tensorrt:x.cache"], "no observer can be exported to tensorrt, which holds per-tensor"),
        (
            ["--qscheme", "symmetric", "--export", "tensorrt:x.cache", "--export-observer", "per_channel"],
            "observer 'per_channel': tensorrt holds per-tensor symmetric int8",
        ),
        (["--export", "json:x", "--export-observer", "mse", "--observer", "kl"], "not among the observers"),
        (["--export", "json:x", "--export-observer", "nope"], "--export-observer: unknown observer 'nope'"),
        (["--dtype", "uint8", "--export", "safetensors:x.st"], "safetensors, which holds per-tensor int8"),
        (["--save", "x.json", "--export", "json:x.json"], "is the same file as --save x.json"),
    ],
)
def test_mistakes_end_before_calibrating(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "calibrate", "--batches", "1", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
