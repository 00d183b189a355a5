"""Compiled kernels on a real CUDA device (marked ``gpu``: skipped without one; see benchmarks/gpu_check.sh).

The interpreter comparisons again on CUDA, plus what only a GPU shows: offsets beyond 2**31 elements, no
host synchronization in ``forward`` (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph capture and
replay, and ``torch.compile(fullgraph=True)`` with inductor.
"""

import pytest
import torch

import mono_quant
from mono_quant.grid import bin_index
from mono_quant.state import HistogramState, RangeState

pytestmark = pytest.mark.gpu

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
from mono_quant.kernels import _common  # noqa: E402
from mono_quant.kernels import histogram as khist  # noqa: E402
from mono_quant.kernels import minmax as kmm  # noqa: E402
from mono_quant.kernels import minmax_one_launch as kol  # noqa: E402

DEV = "cuda"

OBSERVERS = [
    (mono_quant.MinMaxObserver, {}),
    (mono_quant.MovingAverageMinMaxObserver, {"averaging_constant": 0.1}),
    (mono_quant.PerChannelMinMaxObserver, {"ch_axis": -1}),
    (mono_quant.MovingAveragePerChannelMinMaxObserver, {"ch_axis": 0}),
    (mono_quant.HistogramObserver, {"bins": 2048}),
]


def _data(shape, dtype):
    xs = [torch.randn(shape, device=DEV) * s + o for s, o in ((1, 0), (2, -3), (0.5, 4), (1, 0))]
    xs[1].view(-1)[::101] = float("nan")
    xs[2].view(-1)[7 % xs[2].numel()] = float("inf")
    return [x.to(dtype) for x in xs]


def _assert_same(a, b):
    for (name, g), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(g, w), (name, g, w)


@pytest.mark.parametrize("cls,kwargs", OBSERVERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (4097,), (257, 1000), (3, 17, 512), (64, 32, 7, 7)])
def test_triton_equals_torch_on_cuda(cls, kwargs, dtype, shape):
    tri = cls(backend="triton", **kwargs).to(DEV)
    ref = cls(backend="torch", **kwargs).to(DEV)
    for x in _data(shape, dtype):
        tri(x)
        ref(x)
    _assert_same(tri, ref)  # bit for bit, the EMA too (its finalize is compiled without FMA)


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
def test_histogram_strategies_on_cuda(strategy):
    obs = mono_quant.HistogramObserver(bins=2048, backend="torch").to(DEV)
    state = HistogramState(*(b.clone() for b in obs.state()))
    concentrated = torch.randn(1 << 20, device=DEV).round().to(torch.bfloat16)  # 7 bins hold almost all
    for x in [*_data((1 << 20,), torch.bfloat16), concentrated]:
        khist.histogram_update_(x, state, strategy=strategy)
        obs(x)
    for g, w in zip(state, obs.state(), strict=True):
        assert torch.equal(g, w)


MINMAX_OBSERVERS = OBSERVERS[:4]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("kernel", kmm.MINMAX_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minmax_kernels_on_cuda(kernel, dtype, fast, monkeypatch):
    monkeypatch.setattr(_common, "FAST_LAUNCH", fast)  # the scratch cache and direct launches (opt-in)
    # past several waves of persistent programs, NaN/Inf in the tiles of chosen programs (the one-launch
    # kernel re-reads those) and in the ragged tail; per channel on [tokens, hidden] and NCHW
    block = kol.block_for(torch.empty(0, dtype=dtype).element_size()) * kol.UNROLL
    n = 40 * block * torch.cuda.get_device_properties(0).multi_processor_count + 1234
    xs = [torch.randn(n, device=DEV, dtype=dtype) * s + o for s, o in ((1, 0), (2, -3), (4, 1))]
    for pos in (3, 17 * block + 5, n - 1):
        xs[1][pos] = float("nan")
    xs[2][5 * block + 1] = float("-inf")
    for c in (None, 0.1):
        got, want = RangeState.empty((), DEV), RangeState.empty((), DEV)
        for x in xs:
            kernels.minmax_update_(x, got, c, kernel=kernel)
            mono_quant.reference.minmax_update_(x, want, c)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), (kernel, c, g, w)
    for shape, axis in (
        ((4099, 4096), -1),
        ((16, 64, 28, 28), 1),
        ((16, 64, 32, 32), 1),
        ((64, 32, 3, 3), 0),
    ):
        x = torch.randn(shape, device=DEV, dtype=dtype)
        x.view(-1)[::10_007] = float("nan")
        got, want = RangeState.empty((shape[axis],), DEV), RangeState.empty((shape[axis],), DEV)
        for batch in (x, x * 2 + 1):
            kernels.minmax_per_channel_update_(batch, axis, got, 0.1, kernel=kernel)
            mono_quant.reference.minmax_per_channel_update_(batch, axis, want, 0.1)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), (kernel, shape, axis)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("kernel", kmm.MINMAX_KERNELS)
@pytest.mark.parametrize("cls,kwargs", MINMAX_OBSERVERS, ids=lambda v: getattr(v, "__name__", ""))
def test_minmax_kernels_never_sync_and_replay(kernel, cls, kwargs, fast, monkeypatch):
    # every MinMax kernel as the default: forward stays sync-free and a captured CUDA graph replays it
    # exactly (the one-launch kernel's ticket is back at 0 after every launch), with and without the
    # scratch cache and the direct launches (a graph being captured takes fresh scratch)
    monkeypatch.setattr(kmm, "MINMAX_KERNEL", kernel)
    monkeypatch.setattr(_common, "FAST_LAUNCH", fast)
    test_forward_never_syncs(cls, kwargs, "triton")
    test_cuda_graph_replay_equals_eager(cls, kwargs)


def test_more_than_2_31_elements():
    n = (1 << 31) + 4099
    x = torch.empty(n, dtype=torch.bfloat16, device=DEV).uniform_(-1, 1)
    x[-1] = 7.0  # the max sits past the 2**31 boundary
    x[-2] = float("nan")
    st = RangeState.empty((), DEV)
    kernels.minmax_update_(x, st)
    assert float(st[1]) == 7.0 and st[2].tolist() == [n - 1, 1, 1]
    obs = mono_quant.HistogramObserver(bins=256, backend="triton").to(DEV)
    obs(x)
    assert int(obs.counts.sum()) == n - 1 and float(obs.running_max) == 7.0
    top = bin_index(torch.tensor([7.0], device=DEV), obs.exponent, obs.origin)  # read past 2**31
    assert int(obs.counts.nonzero().max()) == int(top) and int(obs.counts[top]) >= 1
    pc = mono_quant.PerChannelMinMaxObserver(ch_axis=-1, backend="triton").to(DEV)
    pc(x[: (1 << 31) + 4096].view(-1, 4096))
    want = [(1 << 31) + 4096, 0, 1, 0]
    assert float(pc.running_max.max()) <= 1.0 and pc.seen.tolist() == want  # no NaN there
    st = RangeState.empty((), DEV)
    kernels.minmax_update_(x, st, kernel="one_launch")
    assert float(st[1]) == 7.0 and st[2].tolist() == [n - 1, 1, 1]
    pc = RangeState.empty((4096,), DEV)
    kernels.minmax_per_channel_update_(x[: (1 << 31) + 4096].view(-1, 4096), -1, pc, kernel="one_launch")
    assert float(pc.running_max.max()) <= 1.0 and pc.seen.tolist() == [(1 << 31) + 4096, 0, 1, 0]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("cls,kwargs", OBSERVERS, ids=lambda v: getattr(v, "__name__", ""))
def test_forward_never_syncs(cls, kwargs, backend):
    obs = cls(backend=backend, **kwargs).to(DEV)
    xs = _data((512, 1024), torch.bfloat16)
    obs(xs[0])  # first call: per-channel buffers are sized, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs * 3:
            obs(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(obs.seen[2]) == 1 + 3 * len(xs)


@pytest.mark.parametrize("cls,kwargs", OBSERVERS, ids=lambda v: getattr(v, "__name__", ""))
def test_cuda_graph_replay_equals_eager(cls, kwargs):
    eager = cls(backend="triton", **kwargs).to(DEV)
    graphed = cls(backend="triton", **kwargs).to(DEV)
    xs = _data((300, 700), torch.bfloat16)
    static = xs[0].clone()
    eager(static), graphed(static)  # warm-up outside capture (compiles, sizes buffers), same on both
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graphed(static)
    torch.cuda.current_stream().wait_stream(side)
    for x in xs[1:] * 2:
        static.copy_(x)
        g.replay()
        eager(x)
    torch.cuda.synchronize()
    _assert_same(graphed, eager)


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
def test_histogram_strategy_never_syncs_and_replays(strategy, monkeypatch):
    # every binning as the default: forward stays sync-free and a captured CUDA graph replays it exactly
    monkeypatch.setattr(khist, "HIST_STRATEGY", strategy)
    test_forward_never_syncs(mono_quant.HistogramObserver, {"bins": 2048}, "triton")
    test_cuda_graph_replay_equals_eager(mono_quant.HistogramObserver, {"bins": 2048})


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 16)
            self.o1 = mono_quant.HistogramObserver(bins=128, backend="triton")
            self.o2 = mono_quant.MovingAverageMinMaxObserver(backend="triton")
            self.fc2.register_forward_hook(lambda m, a, out: self.o2(out))

        def forward(self, x):
            return self.fc2(self.o1(self.fc1(x)).relu())

    eager, compiled = Net().to(DEV), Net().to(DEV)
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, fullgraph=True)
    for s in (1.0, 2.0, 0.5):
        x = torch.randn(32, 64, device=DEV) * s
        torch.testing.assert_close(run(x), eager(x))
    _assert_same(compiled, eager)
