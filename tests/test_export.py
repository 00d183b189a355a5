"""``mono_quant.export``: TensorRT calibration caches, safetensors for vLLM's compressed-tensors loader, JSON.

Every file is read back (the cache by the parser below, safetensors by the ``safetensors`` package) and
compared with the observers it came from; layer names are the model's ``named_modules()`` names.
"""

import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant import compare, io
from mono_quant.export import TRT_VERSION, refusal, safetensors_bytes


def parse_tensorrt_cache(text: str) -> tuple[str, dict[str, float]]:
    """``(header, {tensor name: scale})`` of a TensorRT calibration cache: a header line, then one
    ``name: XXXXXXXX`` line per tensor, the hex digits the big-endian bits of a float32."""
    header, *lines = text.splitlines()
    scales = {}
    for line in lines:
        name, sep, bits = line.rpartition(": ")
        assert sep and len(bits) == 8, line
        scales[name] = struct.unpack(">f", bytes.fromhex(bits))[0]
    return header, scales


class Block(nn.Module):
    """q / k / v read one tensor (a shared-input group); o and the MLP read their own."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.o(self.q(x) * self.k(x) + self.v(x))
        return self.down(torch.relu(self.up(h)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 5, 16, generator=g) * (1 + 10 * (torch.arange(16) == 3)) for _ in range(3)]


def _calibrate(model, batches, kind="kl", **kwargs):
    return mq.run_calibration(model, batches, kind, observer_kwargs=kwargs)


def _amax(obs) -> float:
    lo, hi = obs._range()
    return max(-float(lo), float(hi), 0.0)


# --- TensorRT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["minmax", "kl", "percentile"])
def test_tensorrt_cache_round_trip(tmp_path, model, batches, kind):
    result = _calibrate(model, batches, kind, qscheme="symmetric")
    path = tmp_path / "calib.cache"
    done = mq.export(result, str(path), format="tensorrt")
    header, scales = parse_tensorrt_cache(path.read_text())
    assert header == f"TRT-{TRT_VERSION}-EntropyCalibration2"
    names = {name for name, _ in model.named_modules()}
    assert list(scales) == list(result) and set(scales) <= names
    assert done.layers == dict.fromkeys(result, kind)
    for layer, obs in result.items():
        want = np.float32(np.float32(_amax(obs)) / np.float32(127.0))
        assert scales[layer] == float(want), layer
        # the observer's own int8 scale spans [-128, 127]: amax / 127.5, the same amax
        scale, _ = obs.calculate_qparams()
        assert scales[layer] * 127 == pytest.approx(float(scale) * 127.5, rel=1e-6)


def test_tensorrt_shared_inputs_share_the_scale(tmp_path, model, batches):
    result = _calibrate(model, batches, "minmax", qscheme="symmetric")
    assert result.groups()["0.q"] == ["0.q", "0.k", "0.v"]
    path = tmp_path / "c.cache"
    mq.export(result, str(path), format="tensorrt")
    _, scales = parse_tensorrt_cache(path.read_text())
    assert scales["0.q"] == scales["0.k"] == scales["0.v"] != scales["0.o"]


def test_tensorrt_calibrator_version_and_names(tmp_path, model, batches):
    result = _calibrate(model, batches, "minmax", qscheme="symmetric")
    path = tmp_path / "c.cache"
    mq.export(
        result,
        str(path),
        format="tensorrt",
        calibrator="MinMaxCalibration",
        trt_version=100300,
        tensor_names={"0.q": "/blocks.0/q/MatMul_input"},
    )
    header, scales = parse_tensorrt_cache(path.read_text())
    assert header == "TRT-100300-MinMaxCalibration"
    assert "/blocks.0/q/MatMul_input" in scales and "0.q" not in scales and "0.k" in scales
    with pytest.raises(ValueError, match="calibrator 'Entropy' is not one of"):
        mq.export(result, str(path), format="tensorrt", calibrator="Entropy")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "MinMaxObserver\\(dtype=qint8, qscheme='affine'\\) is not"),
        ({"qscheme": "symmetric", "dtype": torch.quint8}, "quint8"),
        ({"qscheme": "symmetric", "reduce_range": True}, "reduce_range=True"),
        ({"qscheme": "symmetric", "dtype": torch.int4}, "int4"),
    ],
)
def test_tensorrt_refuses_what_it_cannot_hold_before_writing(tmp_path, model, batches, kwargs, match):
    result = _calibrate(model, batches, "minmax", **kwargs)
    path = tmp_path / "c.cache"
    path.write_text("old")
    with pytest.raises(ValueError, match=match) as info:
        mq.export(result, str(path), format="tensorrt")
    assert "layer '0.q'" in str(info.value) and "symmetric int8" in str(info.value)
    assert path.read_text() == "old"


def test_per_channel_activations_are_refused(model, batches):
    result = _calibrate(model, batches, "per_channel", qscheme="symmetric")
    for fmt in ("tensorrt", "safetensors"):
        assert "per channel (ch_axis=-1)" in refusal(fmt, result["0.q"])
    assert refusal("json", result["0.q"]) is None
    with pytest.raises(ValueError, match="export format 'onnx' is not one of"):
        refusal("onnx", result["0.q"])


# --- safetensors ------------------------------------------------------------------------------------------


def _read_safetensors(path):
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("qscheme", ["symmetric", "affine"])
@pytest.mark.parametrize("weights", ["channel", "tensor"])
def test_safetensors_round_trip_int8(tmp_path, model, batches, qscheme, weights):
    result = _calibrate(model, batches, "mse", qscheme=qscheme)
    path = tmp_path / "scales.safetensors"
    mq.export(result, str(path), format="safetensors", model=model, weights=weights)
    tensors, meta = _read_safetensors(path)
    modules = dict(model.named_modules())
    expected = {f"{layer}.{k}" for layer in result for k in ("input_scale", "weight_scale")}
    if qscheme == "affine":
        expected |= {f"{layer}.input_zero_point" for layer in result}
    assert set(tensors) == expected
    for layer, obs in result.items():
        scale, zp = obs.calculate_qparams()
        got = tensors[f"{layer}.input_scale"]
        assert got.dtype == torch.float32 and got.shape == (1,) and torch.equal(got, scale.reshape(1))
        if qscheme == "affine":
            z = tensors[f"{layer}.input_zero_point"]
            assert z.dtype == torch.int8 and z.shape == (1,) and int(z) == int(zp)
        w = modules[layer].weight.detach()
        ws = tensors[f"{layer}.weight_scale"]
        if weights == "channel":
            want = w.abs().amax(dim=1, keepdim=True) / 127.5  # symmetric int8, as compressed-tensors computes
            assert ws.shape == (w.shape[0], 1)
        else:
            want = w.abs().amax().reshape(1) / 127.5
            assert ws.shape == (1,)
        torch.testing.assert_close(ws, want, rtol=1e-6, atol=0)
    assert meta["format"] == "mono_quant.export" and meta["version"] == "1"
    q = json.loads(meta["quantization"])
    assert q["dtype"] == "int8"
    assert q["input"] == {"scheme": qscheme, "granularity": "tensor", "static": True}
    assert q["weight"] == {"scheme": "symmetric", "granularity": weights}
    assert q["observers"] == dict.fromkeys(result, "mse")
    assert q["groups"] == {"0.q": ["0.q", "0.k", "0.v"], "1.q": ["1.q", "1.k", "1.v"]}


def test_safetensors_fp8(tmp_path, model, batches):
    result = _calibrate(model, batches, "minmax", dtype=torch.float8_e4m3fn)
    path = tmp_path / "fp8.safetensors"
    mq.export(result, str(path), format="safetensors", model=model, weights="tensor")
    tensors, meta = _read_safetensors(path)
    assert json.loads(meta["quantization"])["dtype"] == "float8_e4m3fn"
    for layer, obs in result.items():
        assert float(tensors[f"{layer}.input_scale"]) == pytest.approx(_amax(obs) / 448, rel=1e-6)
        amax = float(dict(model.named_modules())[layer].weight.detach().abs().max())
        assert float(tensors[f"{layer}.weight_scale"]) == pytest.approx(amax / 448, rel=1e-6)
    assert not any(k.endswith("zero_point") for k in tensors)


def test_safetensors_needs_the_model_for_weights(tmp_path, model, batches):
    result = _calibrate(model, batches, "minmax")
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="pass model=, or weights=None"):
        mq.export(result, str(path), format="safetensors")
    assert not path.exists()
    mq.export(result, str(path), format="safetensors", weights=None)
    tensors, meta = _read_safetensors(path)
    assert not any(k.endswith("weight_scale") for k in tensors)
    assert json.loads(meta["quantization"])["weight"] is None
    with pytest.raises(ValueError, match="'0.q' is not a module of the model"):
        mq.export(result, str(path), format="safetensors", model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weights='row' is not one of"):
        mq.export(result, str(path), format="safetensors", model=model, weights="row")


def test_safetensors_writer_matches_the_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"b.x": torch.tensor([1.5, -2.0]), "a": torch.tensor([[-3]], dtype=torch.int8)}
    path = tmp_path / "t.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {"k": "v"}))
    loaded = st.load_file(str(path))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0  # the header is padded to 8 bytes
    with pytest.raises(TypeError, match="float32 or int8"):
        safetensors_bytes({"x": torch.zeros(1, dtype=torch.float16)}, {})


# --- JSON, comparisons, skipped layers ----------------------------------------------------------------


def test_json_round_trip(tmp_path, model, batches):
    result = _calibrate(model, batches, "percentile")
    path = tmp_path / "q.json"
    mq.export(result, str(path), format="json")
    loaded = io.load_qparams(str(path))
    assert list(loaded) == list(result)
    for layer, (scale, zp) in result.qparams().items():
        got_scale, got_zp = loaded[layer]["percentile"]
        assert torch.equal(got_scale, scale) and torch.equal(got_zp, zp)


def test_comparison_best_per_layer_among_what_the_format_holds(tmp_path, model, batches):
    kinds = ["minmax", "mse", "per_channel"]
    cmp = compare.compare_observers(model, batches[:2], batches[2], kinds, torch.int8, "symmetric")
    path = tmp_path / "best.cache"
    done = mq.export(cmp, str(path), format="tensorrt")
    _, scales = parse_tensorrt_cache(path.read_text())
    for layer, row in cmp.scores.items():
        per_tensor = {k: s for k, s in row.items() if k != "per_channel"}
        best = max(per_tensor, key=lambda k: per_tensor[k].sqnr_db)
        assert done.layers[layer] == best
        assert scales[layer] == float(np.float32(np.float32(_amax(row[best].observer)) / np.float32(127)))
    done = mq.export(cmp, str(path), format="tensorrt", observer="minmax")
    assert set(done.layers.values()) == {"minmax"}
    with pytest.raises(ValueError, match="observer 'per_channel': tensorrt holds"):
        mq.export(cmp, str(path), format="tensorrt", observer="per_channel")
    with pytest.raises(ValueError, match="observer 'kl' is not among those calibrated: minmax, mse"):
        mq.export(cmp, str(path), format="tensorrt", observer="kl")
    mq.export(cmp, str(tmp_path / "all.json"), format="json")
    assert set(io.load_qparams(str(tmp_path / "all.json"))["0.q"]) == set(kinds)


def test_layers_that_saw_nothing_are_skipped(tmp_path):
    observers = {"a": mq.MinMaxObserver(qscheme="symmetric"), "b": mq.MinMaxObserver(qscheme="symmetric")}
    observers["a"](torch.randn(10))
    done = mq.export(observers, str(tmp_path / "c.cache"), format="tensorrt")
    assert done.layers == {"a": "minmax"} and "b" in done.skipped
    with pytest.raises(TypeError, match="export takes a CalibrationResult"):
        mq.export([1, 2], str(tmp_path / "x"), format="json")


def test_per_expert_observers_are_refused_before_writing(tmp_path):
    obs = mq.MinMaxObserver(qscheme="symmetric")
    obs(torch.randn(6, 8), segments=torch.tensor([0, 1, 2, 0, 1, 2]), num_segments=3)
    for fmt in ("tensorrt", "safetensors"):
        assert "keeps 3 experts" in refusal(fmt, obs)
        path = tmp_path / f"out.{fmt}"
        with pytest.raises(ValueError, match="keeps 3 experts") as info:
            mq.export({"experts.gate_up_proj": obs}, str(path), format=fmt, weights=None)
        assert "experts.gate_up_proj" in str(info.value) and not path.exists()
    assert refusal("json", obs) is None
