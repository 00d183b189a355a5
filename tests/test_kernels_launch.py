"""Host time per call (``kernels._common``): the scratch cache, the direct launch of a compiled kernel and the
specialization key it is matched on, checked on the CPU (the direct path itself runs only on CUDA, in
``tests/test_gpu.py`` and ``benchmarks/gpu_gate.py``)."""

import pytest
import torch

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
from mono_quant.kernels import _common  # noqa: E402
from mono_quant.kernels import minmax as kmm  # noqa: E402

from mono_quant import reference  # noqa: E402
from mono_quant.state import RangeState  # noqa: E402


def _triton_spec(value):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


INTS = [0, 1, 2, 15, 16, 17, 48, 4099, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40 + 3, -1, -16, -(2**31),
        -(2**31) - 1, 2**63 - 16, 2**63, 2**63 + 16]  # fmt: skip


def test_spec_partitions_values_as_triton_does():
    # two values share a key exactly when Triton compiles them into the same specialization
    base = torch.empty(64)
    tensors = [base, base[1:], base[4:], base[3:], base.bfloat16(), base.bfloat16()[8:], base.bfloat16()[1:],
               base.double(), base.double()[2:]]  # fmt: skip
    pytest.importorskip("triton._C.libtriton", reason="Triton's native specialization is not importable")
    for values in (INTS + [0.5, -3.0], tensors):
        for a in values:
            for b in values:
                same_ours = _common.spec(a) == _common.spec(b) and type(a) is type(b)
                assert same_ours == (_triton_spec(a) == _triton_spec(b)), (a, b)


class _FakeKernel:
    """What ``JITFunction.run`` returns: a compiled kernel with ``run``, ``function``, ``packed_metadata``."""

    def __init__(self, log):
        self.function, self.packed_metadata, self.log = "fn", "meta", log

    def run(self, *args):
        self.log.append(("direct", args))


class _FakeJIT:
    """A ``@triton.jit`` function: ``fn[grid](*args, **kwargs)`` is the normal launch."""

    def __init__(self):
        def kernel(x_ptr, n, c, BLOCK, EMA):  # the signature is what the launcher reads
            pass

        self.fn, self.log, self.kernels = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("normal", grid, args, kwargs))
            self.kernels.append(_FakeKernel(self.log))
            return self.kernels[-1]

        return launch


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_common, "FAST_LAUNCH", True)
    monkeypatch.setattr(_common, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(_common, "_DIRECT_DEVICES", ("cpu",))  # the direct path, here on CPU tensors


def test_launcher_calls_the_compiled_kernel_when_the_key_matches(fast, monkeypatch):
    jit = _FakeJIT()
    launch = _common.Launcher(jit, num_warps=8)
    x = torch.empty(4096)
    first = launch((8,), (x, 4096, 0.5), (x, 4096), BLOCK=1024, EMA=True)
    assert jit.log[-1][0] == "normal" and jit.log[-1][3]["num_warps"] == 8
    assert launch((8,), (x, 8192, 0.25), (x, 8192), BLOCK=1024, EMA=True) is first  # same specialization
    assert jit.log[-1] == (
        "direct",
        (8, 1, 1, 1234, "fn", "meta", None, None, None, x, 8192, 0.25, 1024, True),
    )
    # anything Triton specializes on differently takes the normal launch (and gets its own entry)
    for args, varying, consts in [
        ((x[1:], 4095, 0.5), (x[1:], 4095), {"BLOCK": 1024, "EMA": True}),  # an unaligned view
        ((x, 1, 0.5), (x, 1), {"BLOCK": 1024, "EMA": True}),  # n == 1: a constant
        ((x, 4097, 0.5), (x, 4097), {"BLOCK": 1024, "EMA": True}),  # n not divisible by 16
        ((x, 2**31 + 16, 0.5), (x, 2**31 + 16), {"BLOCK": 1024, "EMA": True}),  # int64
        ((x.bfloat16(), 4096, 0.5), (x.bfloat16(), 4096), {"BLOCK": 1024, "EMA": True}),  # dtype
        ((x, 4096, 0.5), (x, 4096), {"BLOCK": 1024, "EMA": False}),  # a constexpr
    ]:
        count = len(jit.kernels)
        launch((8,), args, varying, **consts)
        assert jit.log[-1][0] == "normal" and len(jit.kernels) == count + 1, (args, consts)
        launch((8,), args, varying, **consts)
        assert jit.log[-1][0] == "direct", (args, consts)
    # a launch hook (a profiler, say) sees every launch: the normal path
    monkeypatch.setattr(_common, "_launch_hooks", lambda: True)
    launch((8,), (x, 4096, 0.5), (x, 4096), BLOCK=1024, EMA=True)
    assert jit.log[-1][0] == "normal"


def test_launcher_without_fast_launch_always_launches_normally(monkeypatch):
    monkeypatch.setattr(_common, "FAST_LAUNCH", False)
    monkeypatch.setattr(_common, "_DIRECT_DEVICES", ("cpu",))
    jit = _FakeJIT()
    launch = _common.Launcher(jit, num_warps=4)
    x = torch.empty(16)
    for _ in range(3):
        launch((1,), (x, 16, 0.0), (x, 16), BLOCK=16, EMA=False)
    assert [entry[0] for entry in jit.log] == ["normal"] * 3


def test_partials_are_cached_grown_and_aligned(monkeypatch):
    monkeypatch.setattr(_common, "_SCRATCH", {})
    monkeypatch.setattr(_common, "FAST_LAUNCH", False)
    dev = torch.device("cpu")
    a, b = _common.partials(dev, 10, None, 2), _common.partials(dev, 10, None, 2)
    assert a[0].data_ptr() != b[0].data_ptr() and a[3].tolist() == [0, 0]  # fresh each call
    monkeypatch.setattr(_common, "FAST_LAUNCH", True)
    first = _common.partials(dev, 5, 7, 3)
    assert [tuple(t.shape) for t in first] == [(5, 7), (5, 7), (5, 7), (3,)] and not first[3].any()
    assert _common.partials(dev, 5, 7, 3) is first  # the same views, nothing allocated
    other = _common.partials(dev, 999, None, 1)  # another shape: views of the same buffers
    assert other[0].data_ptr() == first[0].data_ptr() and other[2].data_ptr() == first[2].data_ptr()
    for views in (first, other, _common.partials(dev, 1 << 17, None, 1)):  # the last one grows them
        assert all(v.data_ptr() % 16 == 0 for v in views)
        assert views[1].data_ptr() >= views[0].data_ptr() + 4 * views[0].numel()  # pmin, pmax apart
    assert _common.partials(dev, 5, 7, 3) is not first  # grown: new buffers, new views


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel", kmm.MINMAX_KERNELS)
def test_kernels_with_the_scratch_cache_match_the_twin(kernel, monkeypatch):
    # cached scratch: the partials of one update are the garbage of the next, the tickets must be back at 0
    monkeypatch.setattr(_common, "_SCRATCH", {})
    monkeypatch.setattr(_common, "FAST_LAUNCH", True)
    shapes = [((20_000,), None), ((33, 70), -1), ((3, 9, 40), 1), ((9_000,), None), ((4, 6, 8, 8), 1)]
    states = {}
    for rounds in range(2):
        for shape, axis in shapes:
            x = torch.randn(shape) * (rounds + 1)
            x.view(-1)[:: 97 + rounds] = float("nan")
            size = () if axis is None else (shape[axis],)
            got, want = states.setdefault((shape, axis), (RangeState.empty(size), RangeState.empty(size)))
            if axis is None:
                kernels.minmax_update_(x, got, 0.1, kernel=kernel)
                reference.minmax_update_(x, want, 0.1)
            else:
                kernels.minmax_per_channel_update_(x, axis, got, 0.1, kernel=kernel)
                reference.minmax_per_channel_update_(x, axis, want, 0.1)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w), (shape, axis)
    ((_, _, tickets),) = [entry["buffers"] for entry in _common._SCRATCH.values()]
    assert not tickets.any()
