"""The factory and the calibration runner."""

import pytest
import torch
from torch import nn

from mono_quant import (
    ExperimentalWarning,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    create_observer,
    run_calibration,
)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("minmax", MinMaxObserver),
        ("MinMaxObserver", MinMaxObserver),
        ("min_max", MinMaxObserver),
        ("moving-average", MovingAverageMinMaxObserver),
        ("MovingAverageMinMax", MovingAverageMinMaxObserver),
        ("EMA", MovingAverageMinMaxObserver),
        ("histogram", HistogramObserver),
        ("HistogramObserver", HistogramObserver),
        ("kl", HistogramObserver),
        ("per_channel_minmax", PerChannelMinMaxObserver),
        ("moving_average_per_channel_minmax", MovingAveragePerChannelMinMaxObserver),
    ],
)
def test_factory_names(name, cls):
    assert type(create_observer(name)) is cls


def test_factory_passes_keywords():
    assert create_observer("histogram", bins=1024).bins == 1024
    assert create_observer("ema", averaging_constant=0.5).averaging_constant == 0.5
    assert create_observer("perchannelminmax", ch_axis=1).ch_axis == 1
    assert create_observer("minmax", dtype=torch.quint8).dtype == torch.quint8
    with pytest.raises(ValueError, match="bins"):
        create_observer("histogram", bins=-1)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names:.*histogram.*minmax"):
        create_observer("entropy")


@pytest.mark.parametrize(
    "kwargs, cls",
    [
        ({}, MinMaxObserver),
        ({"averaging_constant": 0.1}, MovingAverageMinMaxObserver),
        ({"bins": 256}, HistogramObserver),
        ({"method": "mse"}, HistogramObserver),
    ],
)
def test_auto_is_experimental_and_picks_by_keywords(kwargs, cls):
    with pytest.warns(ExperimentalWarning, match="experimental"):
        obs = create_observer("auto", **kwargs)
    assert type(obs) is cls


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x, scale=1.0):
        x = self.act(self.conv(x))
        return self.fc2(self.act(self.fc1(x.flatten(1)))) * scale


def _data(n=4):
    return [torch.randn(2, 3, 8, 8) for _ in range(n)]


@pytest.mark.parametrize("observer", ["minmax", "histogram", "ema", "per_channel_minmax"])
def test_runner_observes_each_layer_input(observer):
    model = TinyNet().train()
    data = _data()
    kwargs = {"ch_axis": 1} if observer == "per_channel_minmax" else {}
    result = run_calibration(model, data, observer, observer_kwargs=kwargs, progress=False)
    assert list(result) == ["conv", "fc1", "fc2"]
    assert result.batches == 4
    assert model.training  # restored
    assert not model.conv._forward_pre_hooks and not model.fc2._forward_pre_hooks
    qparams = result.qparams()
    assert set(qparams) == {"conv", "fc1", "fc2"}
    if observer == "minmax":
        inputs = torch.cat([d.flatten() for d in data])
        assert float(result["conv"].min_val) == float(inputs.min())
        assert float(result["conv"].max_val) == float(inputs.max())
        assert float(result["fc1"].min_val) >= 0.0  # after a ReLU


def test_runner_accepts_tuples_dicts_and_limits():
    model = TinyNet()
    batches = [(torch.randn(1, 3, 8, 8), 2.0), {"x": torch.randn(1, 3, 8, 8), "scale": 0.5}]
    result = run_calibration(model, batches * 3, MinMaxObserver, max_batches=5, progress=False)
    assert result.batches == 5
    assert int(result["conv"].seen[2]) == 5


def test_runner_removes_hooks_and_restores_mode_when_the_model_raises():
    model = TinyNet().train()

    def data():
        yield torch.randn(1, 3, 8, 8)
        yield torch.randn(1, 5, 8, 8)  # wrong channel count: the conv raises

    with pytest.raises(RuntimeError):
        run_calibration(model, data(), progress=False)
    assert model.training
    for m in model.modules():
        assert not m._forward_pre_hooks


def test_runner_grad_is_off_and_model_runs_in_eval():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            seen["grad"] = torch.is_grad_enabled()
            seen["training"] = self.training
            return self.fc(x)

    run_calibration(Probe().train(), [torch.randn(2, 3)], progress=False)
    assert seen == {"grad": False, "training": False}


def test_runner_places_each_observer_where_its_activations_are():
    # a parameter-free target (and any module whose inputs live elsewhere than its parameters, as with
    # offloading): the observer follows its input; the meta device stands in for CUDA here
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU())
    result = run_calibration(model, [torch.randn(2, 3)], modules=(nn.Linear, nn.GELU))
    assert [o.seen.device.type for o in result.observers.values()] == ["cpu", "cpu"]
    seen = []

    class Recorder(MinMaxObserver):  # records where it observes (observers refuse meta tensors themselves)
        def forward(self, x):
            seen.append((x.device.type, self.seen.device.type, self.running_min.device.type))
            return x

    meta = nn.Sequential(nn.GELU(), nn.ReLU())
    run_calibration(meta, [torch.empty(2, 3, device="meta")] * 2, Recorder, modules=(nn.GELU,))
    assert seen == [("meta", "meta", "meta")] * 2


def test_runner_without_matching_modules():
    with pytest.raises(ValueError, match="no module of type"):
        run_calibration(nn.Sequential(nn.ReLU()), [torch.randn(2)], progress=False)


def test_runner_progress_bar(capsys):
    run_calibration(TinyNet(), _data(12), progress=True)
    assert "calibrating" in capsys.readouterr().err
    run_calibration(TinyNet(), _data(12), progress=False)
    assert "calibrating" not in capsys.readouterr().err


def test_a_compiled_model_is_calibrated_under_its_original_names():
    torch._dynamo.reset()
    model = TinyNet()
    compiled = torch.compile(model, backend="eager")
    result = run_calibration(compiled, _data(2), progress=False)
    assert list(result) == ["conv", "fc1", "fc2"]
    assert all(int(obs.seen[2]) == 2 for obs in result.values())


def test_a_compiled_model_does_not_recompile_per_batch():
    # the observers' hooks run eagerly: traced, dynamo guarded on each input's identity (shared inputs) and
    # compiled the model again for every batch
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(TinyNet(), backend=counter)
    run_calibration(compiled, _data(2), "histogram", progress=False)
    frames = counter.frame_count
    result = run_calibration(compiled, _data(6), "histogram", progress=False)
    assert counter.frame_count == frames and all(int(obs.seen[2]) == 6 for obs in result.values())


class FeaturesNet(nn.Module):
    """A forward that takes one dict, as sentence-transformers models do (``model(features)``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, features):
        return self.fc(features["embeddings"] * features["mask"])


def test_dict_batches_go_in_as_the_one_argument_of_a_forward_that_takes_one():
    batches = [{"embeddings": torch.randn(3, 4), "mask": torch.ones(3, 1)} for _ in range(2)]
    result = run_calibration(FeaturesNet(), batches, progress=False)
    assert int(result["fc"].seen[2]) == 2
    # and as keywords where the forward names them
    result = run_calibration(TinyNet(), [{"x": torch.randn(1, 3, 8, 8), "scale": 2.0}], progress=False)
    assert int(result["conv"].seen[2]) == 1


def test_a_batch_the_model_cannot_take_says_how_batches_are_fed():
    with pytest.raises(
        RuntimeError, match=r"(?s)batch 0: TypeError.*a dict batch goes in as keyword arguments"
    ):
        run_calibration(TinyNet(), [{"y": torch.randn(1, 3, 8, 8)}], progress=False)


def test_an_observer_refusing_its_input_is_not_blamed_on_the_model():
    model = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="has 3 channels"):  # the observer's own error, not a RuntimeError
        run_calibration(model, [torch.randn(2, 3), torch.randn(2, 5)], "per_channel", modules=(nn.Identity,))


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "3"])
def test_max_batches_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"max_batches=.* must be a positive int or None"):
        run_calibration(TinyNet(), _data(2), max_batches=bad, progress=False)


def test_an_infinite_generator_is_read_only_up_to_max_batches():
    pulled = []

    def forever():
        while True:
            pulled.append(1)
            yield torch.randn(1, 3, 8, 8)

    result = run_calibration(TinyNet(), forever(), max_batches=3, progress=False)
    assert result.batches == 3 and len(pulled) == 3


def test_per_channel_observers_watch_each_layers_channel_axis():
    result = run_calibration(TinyNet(), _data(2), "per_channel", progress=False)
    assert result["conv"].ch_axis == 1 and result["fc1"].ch_axis == -1
    assert result["conv"].running_min.shape == (3,) and result["fc2"].running_min.shape == (16,)
    explicit = run_calibration(
        TinyNet(), _data(2), "per_channel", observer_kwargs={"ch_axis": 0}, progress=False
    )
    assert explicit["fc1"].ch_axis == 0


class QKV(nn.Module):
    """Separate q / k / v projections of one input, as Llama's attention has them, then an output proj."""

    def __init__(self, switch_after: int | None = None):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.calls, self.switch_after = 0, switch_after

    def forward(self, x):
        self.calls += 1
        other = x.clone() if self.switch_after is not None and self.calls > self.switch_after else x
        return self.o(self.q(x) * self.k(other) + self.v(x))


def test_layers_reading_one_input_share_an_observer_and_its_qparams():
    data = [torch.randn(4, 8) * (i + 1) for i in range(3)]
    result = run_calibration(QKV(), data, "histogram", progress=False)
    assert result.groups() == {"q": ["q", "k", "v"]}
    assert result["q"] is result["k"] is result["v"] and result["o"] is not result["q"]
    assert int(result["q"].seen[2]) == 3  # observed once per batch, not three times
    alone = HistogramObserver()
    for x in data:
        alone(x)
    assert torch.equal(result["q"].counts, alone.counts)
    qp = result.qparams()
    assert all(torch.equal(a, b) for a, b in zip(qp["q"], qp["v"], strict=True))


def test_share_inputs_false_observes_every_layer():
    data = [torch.randn(4, 8) for _ in range(2)]
    result = run_calibration(QKV(), data, share_inputs=False, progress=False)
    assert result.groups() == {} and len({id(o) for o in result.values()}) == 4
    assert all(int(o.seen[2]) == 2 for o in result.values())


def test_layers_that_stop_sharing_their_input_are_an_error():
    with pytest.raises(RuntimeError, match="'q' and 'k' read the same input tensor in the first batch"):
        run_calibration(QKV(switch_after=1), [torch.randn(4, 8) for _ in range(2)], progress=False)


def test_shared_observers_merge_once_per_group():
    from mono_quant import merge_observers

    runs = [run_calibration(QKV(), [torch.randn(4, 8) + i], progress=False) for i in range(2)]
    merged = merge_observers([dict(r) for r in runs])
    assert int(merged["q"].seen[2]) == 2 and merged["q"] is merged["k"]
