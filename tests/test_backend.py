"""Dispatch (``mono_quant.ops``): which backend runs, the errors when the kernels cannot, and torch.compile.

Under ``TRITON_INTERPRET=1`` (set by conftest) ``backend="triton"`` runs the kernels on CPU tensors; on a
CPU tensor ``"auto"`` means the torch reference. ``torch.compile(fullgraph=True)`` must trace observers
without a graph break, through the registered custom ops.
"""

import pytest
import torch

import mono_quant
from mono_quant import ops, ops_backend
from mono_quant.state import RangeState

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def test_resolve_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    x = torch.zeros(3)
    assert ops.resolve_backend(x, "auto") == "torch"
    assert ops.resolve_backend(x, "torch") == "torch"
    with pytest.raises(ValueError, match="backend='cuda'"):
        ops.resolve_backend(x, "cuda")


@pytest.mark.interpreter
def test_resolve_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.triton_available()
    assert ops.resolve_backend(torch.zeros(3), "triton") == "triton"


def test_env_variable_switches_auto(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ops.ENV_BACKEND, "Triton")
    assert ops.resolve_backend(torch.zeros(3), "auto") == "triton"
    assert ops.resolve_backend(torch.zeros(3), "torch") == "torch"  # an explicit choice wins
    monkeypatch.setenv(ops.ENV_BACKEND, "gpu")
    with pytest.raises(ValueError, match="MONO_QUANT_BACKEND='gpu'"):
        ops.resolve_backend(torch.zeros(3), "auto")


def test_forcing_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.minmax_update_(torch.ones(2), RangeState.empty(), backend="triton")


def test_forcing_triton_without_kernels(monkeypatch):
    monkeypatch.setattr(ops_backend, "_kernels", lambda: None)  # ops re-exports the selection
    assert not ops.triton_available()
    with pytest.raises(NotImplementedError, match="mono_quant\\[triton\\]"):
        ops.resolve_backend(torch.zeros(2), "triton")


def test_custom_ops_registered():
    for name in ("minmax_update", "minmax_per_channel_update", "histogram_update"):
        assert hasattr(torch.ops.mono_quant, name)


class Net(torch.nn.Module):
    """Two linears with an inline observer and one in a forward hook."""

    def __init__(self, inline, hooked):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
        self.obs, self.hooked = inline, hooked
        self.fc2.register_forward_hook(lambda mod, args, out: self.hooked(out))

    def forward(self, x):
        return self.fc2(self.obs(self.fc1(x)).relu())


OBSERVERS = [
    (mono_quant.MinMaxObserver, {}),
    (mono_quant.MovingAverageMinMaxObserver, {}),
    (mono_quant.PerChannelMinMaxObserver, {"ch_axis": -1}),
    (mono_quant.HistogramObserver, {"bins": 32}),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("cls,kwargs", OBSERVERS, ids=lambda v: getattr(v, "__name__", ""))
def test_compile_fullgraph_matches_eager(backend, cls, kwargs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    make = lambda: Net(cls(backend=backend, **kwargs), mono_quant.MinMaxObserver(backend=backend))
    eager, compiled = make(), make()
    compiled.load_state_dict(eager.state_dict())
    xs = [torch.randn(4, 16) * s for s in (1.0, 3.0, 0.5)]
    eager(xs[0]), compiled(xs[0])  # per-channel observers size their buffers on the first (eager) call
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for x in xs[1:]:
        torch.testing.assert_close(run(x), eager(x))
    for (name, g), (_, w) in zip(compiled.state_dict().items(), eager.state_dict().items(), strict=True):
        torch.testing.assert_close(g, w, rtol=2e-7, atol=0, msg=name)
    assert int(compiled.obs.seen[2]) == 3
