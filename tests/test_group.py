"""``ObserverGroup`` and ``calibrate_weights``: one call for many observers, the state of one call per
observer, bit for bit; the two-launch kernels (``kernels/group_minmax.py``) under the interpreter."""

import pytest
import torch
from spawn_ranks import count_all_reduce, run_ranks
from torch import nn

import mono_quant as mq
from mono_quant.group import ObserverGroup, calibrate_weights
from mono_quant.group_ops import minmax_update_many_
from mono_quant.state import RangeState


def _tensors(seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    """Sizes 1, odd, a tile and one more (4097), every float dtype, NaN / Inf, an empty and an all-NaN one."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * scale
    a = r(4097)
    a[7], a[4096] = float("nan"), -float("inf")
    return [
        a,
        r(1),
        r(3, 5, 7).half(),
        r(9000).bfloat16(),
        r(33).double() * 1e39,  # beyond float32: counted as non-finite, as everywhere
        torch.empty(0, 4),
        torch.full((5,), float("nan")),
        r(8, 16)[:, ::2],  # not contiguous
    ]


def _observers(backend: str) -> list[mq.ObserverBase]:
    kinds = [
        lambda: mq.MinMaxObserver(backend=backend),
        lambda: mq.MovingAverageMinMaxObserver(averaging_constant=0.3, backend=backend),
        lambda: mq.MinMaxObserver(qscheme="symmetric", backend=backend),
        lambda: mq.MovingAverageMinMaxObserver(averaging_constant=1.0, backend=backend),
    ]
    return [kinds[i % len(kinds)]() for i in range(len(_tensors()))]


def _assert_same_state(got, want):
    for a, b in zip(got, want, strict=True):
        for name, buf in b.named_buffers():
            assert torch.equal(getattr(a, name), buf), (type(b).__name__, name, getattr(a, name), buf)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_group_equals_one_call_per_observer(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    grouped, single, torch_only = _observers(backend), _observers(backend), _observers("torch")
    group = ObserverGroup(grouped)
    for step in range(3):
        xs = _tensors(seed=step, scale=10.0**step)
        group(xs)
        for obs, x in zip(single, xs, strict=True):
            obs(x)
        for obs, x in zip(torch_only, xs, strict=True):
            obs(x)
    _assert_same_state(grouped, single)
    _assert_same_state(grouped, torch_only)  # the kernels' state is the torch twin's
    assert int(grouped[0].seen[1]) == 6  # a NaN and a -inf, 3 times


@pytest.mark.interpreter
@pytest.mark.parametrize("count", [1, 3, 24])
def test_two_launches_whatever_the_number_of_tensors(count, monkeypatch):
    pytest.importorskip("triton")
    from mono_quant.kernels import group_minmax

    launches = []
    for name in ("_PARTIAL", "_FINALIZE"):
        launcher = getattr(group_minmax, name)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            launches.append(_name)
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(group_minmax, name, counted)
    observers = [mq.MinMaxObserver(backend="triton") for _ in range(count)]
    xs = [torch.randn(100 + 500 * i) for i in range(count)]
    ObserverGroup(observers)(xs)
    assert launches == ["_PARTIAL", "_FINALIZE"]
    for obs, x in zip(observers, xs, strict=True):
        assert (float(obs.min_val), float(obs.max_val)) == (float(x.min()), float(x.max()))


def test_other_observers_are_called_in_turn():
    make = [
        lambda: mq.HistogramObserver(bins=64, method="mse"),
        lambda: mq.PerChannelMinMaxObserver(ch_axis=-1),
        lambda: mq.ChannelStatsObserver(),
        lambda: mq.MinMaxObserver(),
    ]
    grouped, single = [m() for m in make], [m() for m in make]
    group = ObserverGroup({f"layer{i}": o for i, o in enumerate(grouped)})
    for step in range(2):
        xs = [torch.randn(6, 10) * (step + 1) for _ in make]
        group({f"layer{i}": x for i, x in enumerate(xs)})
        for obs, x in zip(single, xs, strict=True):
            obs(x)
    _assert_same_state(grouped, single)
    assert [n for n, _ in group.items()] == ["layer0", "layer1", "layer2", "layer3"]


def test_masks_and_segmented_observers_take_the_single_path():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    grouped = [mq.MinMaxObserver(), mq.HistogramObserver(bins=64), mq.MinMaxObserver()]
    single = [mq.MinMaxObserver(), mq.HistogramObserver(bins=64), mq.MinMaxObserver()]
    ObserverGroup(grouped)([x, x, x], masks=[mask, mask, None])
    for obs, m in zip(single, [mask, mask, None], strict=True):
        obs(x) if m is None else obs(x, mask=m)
    _assert_same_state(grouped, single)
    assert grouped[0].masked_count == 3 * 8
    segmented = mq.MinMaxObserver()
    segmented(x.reshape(-1, 8), segments=torch.zeros(10, dtype=torch.long), num_segments=2)
    with pytest.raises(ValueError, match="segmented"):
        ObserverGroup([segmented])([x])
    with pytest.raises(ValueError, match="mask 0: "):
        ObserverGroup([mq.MinMaxObserver()])([x], masks=[torch.ones(3, dtype=torch.bool)])


def test_bad_input_changes_nothing():
    observers = [mq.MinMaxObserver(), mq.MinMaxObserver()]
    group = ObserverGroup(observers)
    with pytest.raises(ValueError, match="got 1 tensors for a group of 2 observers"):
        group([torch.ones(3)])
    with pytest.raises(TypeError, match="tensor 1: cannot observe a tensor of dtype torch.int64"):
        group([torch.ones(3), torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="a mapping of tensors needs a group made from a mapping"):
        group({"a": torch.ones(3), "b": torch.ones(3)})
    assert all(int(o.seen[2]) == 0 for o in observers)  # nothing was observed
    with pytest.raises(ValueError, match="appears twice"):
        ObserverGroup([observers[0], observers[0]])
    with pytest.raises(TypeError, match="observer 'x' is a Linear, not a mono_quant observer"):
        ObserverGroup({"x": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="at least one observer"):
        ObserverGroup([])
    named = ObserverGroup({"a": mq.MinMaxObserver()})
    with pytest.raises(ValueError, match="the same names"):
        named({"b": torch.ones(2)})


def test_update_many_checks_states_first():
    state = RangeState.empty()
    with pytest.raises(ValueError, match="state 1 appears twice"):
        minmax_update_many_([torch.ones(2), torch.ones(2)], [state, state], [None, None])
    with pytest.raises(ValueError, match="state 0: running_min / running_max must be float32 \\(\\)"):
        minmax_update_many_([torch.ones(2)], [RangeState.empty((3,))], [None])
    with pytest.raises(ValueError, match="got 1 tensors, 2 states and 1 averaging constants"):
        minmax_update_many_([torch.ones(2)], [state, RangeState.empty()], [None])
    assert int(state.seen[2]) == 0


def test_calibrate_weights_of_a_model_in_one_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(4, 6, 3), nn.Linear(16, 4))
    for make in (
        lambda: mq.MinMaxObserver(qscheme="symmetric"),
        lambda: mq.PerChannelMinMaxObserver(ch_axis=0),
    ):
        got = calibrate_weights(model, make)
        assert list(got) == ["0", "2", "3"]
        for name, obs in got.items():
            alone = make()
            alone(dict(model.named_modules())[name].weight.detach())
            _assert_same_state([obs], [alone])
    with pytest.raises(ValueError, match="module 'relu' \\(ReLU\\) has no weight tensor"):
        calibrate_weights({"relu": nn.ReLU()}, mq.MinMaxObserver)


# --- across ranks (gloo, CPU) ------------------------------------------------------------------------------


def _sync_rank(rank: int, world: int) -> dict:
    out = {}
    for count in (3, 30):
        group = ObserverGroup({f"l{i}": mq.MinMaxObserver() for i in range(count)})
        group([torch.arange(4.0) * (i + 1) + 10 * rank for i in range(count)])
        out[count] = {"collectives": count_all_reduce(group.sync)}
        out[count]["min"] = [float(o.min_val) for o in group]
        out[count]["max"] = [float(o.max_val) for o in group]
    return out


def test_sync_in_a_fixed_number_of_collectives(tmp_path):
    ranks = run_ranks(2, _sync_rank, tmp_path, __name__)
    for out in ranks:
        assert out[3]["collectives"] == out[30]["collectives"]
        assert out[30]["min"] == [0.0] * 30 and out[30]["max"] == [3.0 * (i + 1) + 10 for i in range(30)]
