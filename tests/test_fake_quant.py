"""FakeQuantize: parity with torch's fake-quantize ops (output and gradient, bit for bit), delayed scaling,
FP8, NaN, switches, state, bad input, torch.compile, the kernel against its twin, torch.ao's fused module."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant import reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
IVIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN equal to NaN."""
    a, b = a.reshape(-1), b.reshape(-1)
    eq = a.view(IVIEW[a.element_size()]) == b.view(IVIEW[b.element_size()])
    return a.dtype == b.dtype and bool((eq | (torch.isnan(a) & torch.isnan(b))).all())


def steps(shape=(64, 48), n=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=g) * (1 + i) + 0.3 * i
        x.view(-1)[:7] = ((torch.arange(7) - 3) + 0.5) * 0.05  # ties, for the rounding
        out.append(x.to(dtype))
    return out


def torch_fake_quant(x, fq):
    """torch's op applied with the module's qparams (what FakeQuantize promises to equal)."""
    if fq.ch_axis is None:
        return torch.fake_quantize_per_tensor_affine(x, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max)
    axis = fq.ch_axis % x.dim()
    return torch.fake_quantize_per_channel_affine(
        x, fq.scale, fq.zero_point, axis, fq.quant_min, fq.quant_max
    )


CASES = [
    ("minmax", {}),
    ("moving_average", {"averaging_constant": 0.3}),
    ("moving_average", {"dtype": torch.quint8, "qscheme": "symmetric"}),
    ("minmax", {"dtype": torch.int4}),
    ("minmax", {"ch_axis": 1}),
    ("moving_average", {"ch_axis": 0, "dtype": torch.quint8}),
    ("per_channel", {"ch_axis": -1, "qscheme": "symmetric"}),
    ("amax_history", {"dtype": torch.qint8, "history_len": 3}),
]


@pytest.mark.parametrize("observer, kwargs", CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_output_and_gradient_are_torchs_bit_for_bit(observer, kwargs, dtype):
    fq = mq.FakeQuantize(observer, backend="torch", **kwargs)
    for x in steps(dtype=dtype):
        x = x.requires_grad_()
        y = fq(x)
        s, z = fq.observer.calculate_qparams()
        assert torch.equal(fq.scale, s) and torch.equal(fq.zero_point, z)  # the observer's, updated first
        grad = torch.randn_like(x)
        (gx,) = torch.autograd.grad(y, x, grad)
        x2 = x.detach().clone().requires_grad_()
        want = torch_fake_quant(x2, fq)
        (gw,) = torch.autograd.grad(want, x2, grad)
        assert same_bits(y.detach(), want.detach()) and same_bits(gx, gw)


def test_clipped_values_get_no_gradient_and_nan_stays_nan():
    fq = mq.FakeQuantize("moving_average", averaging_constant=0.01, backend="torch")
    fq(torch.randn(100))  # the range of a first batch
    x = torch.cat([torch.randn(50) * 30, torch.tensor([float("nan"), float("inf"), -float("inf")])])
    x.requires_grad_()
    y = fq(x)
    assert torch.isnan(y[-3]) and float(y[-2]) == float((127 - fq.zero_point) * fq.scale)
    assert int(fq.observer.seen[1]) == 3  # excluded from the statistics, counted
    (g,) = torch.autograd.grad(y.sum(), x)
    lo, hi = (-128 - fq.zero_point) * fq.scale, (127 - fq.zero_point) * fq.scale
    inside = (x.detach() >= lo - fq.scale / 2) & (x.detach() <= hi + fq.scale / 2)
    assert g[-3:].tolist() == [0.0, 0.0, 0.0] and bool((g[:-3] == inside[:-3].float()).all())
    assert 0 < int(g.sum()) < 50


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "amax_history"])
def test_delayed_quantizes_with_the_qparams_from_before_the_batch(observer):
    kw = {"dtype": torch.qint8} if observer == "amax_history" else {}
    delayed = mq.FakeQuantize(observer, delayed=True, backend="torch", **kw)
    shadow = mq.FakeQuantize(observer, backend="torch", **kw)
    prev = None
    for i, x in enumerate(steps()):
        y = delayed(x)
        if i == 0:  # no qparams yet: observe first
            shadow(x)
        else:
            want, _ = reference.fake_quantize_(x, *prev, -128, 127, None, None)
            assert torch.equal(y, want)
            shadow(x)
        assert torch.equal(delayed.scale, shadow.scale) and torch.equal(delayed.zero_point, shadow.zero_point)
        prev = (shadow.scale.clone(), shadow.zero_point.clone())
    assert torch.equal(delayed.observer.seen, shadow.observer.seen)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("observer", ["minmax", "amax_history", "per_channel"])
def test_fp8_follows_the_functional_and_clips_the_gradient_at_fp8_max(fp8, observer):
    fq = mq.FakeQuantize(observer, dtype=fp8, backend="torch", margin=0)
    fq(torch.randn(32, 16))
    x = (torch.randn(32, 16) * 3).requires_grad_()
    fq.disable_observer()  # keep the qparams: some values fall beyond fp8_max
    y = fq(x)
    axis = None if fq.ch_axis is None else 0
    want = mq.fake_quantize(x.detach(), fq.scale, None, ch_axis=axis, dtype=fp8)
    assert same_bits(y.detach(), want)
    (g,) = torch.autograd.grad(y.sum(), x)
    s = fq.scale if axis is None else fq.scale[:, None]
    assert torch.equal(g, ((x.detach() / s).abs() <= torch.finfo(fp8).max).float())
    assert 0 < int((g == 0).sum()) < x.numel()


def test_switches_state_dict_and_reset():
    fq = mq.FakeQuantize("minmax", backend="torch")
    x = torch.randn(100)
    fq.disable_fake_quant()
    assert fq(x) is x and int(fq.fake_quant_enabled) == 0
    fq.enable_fake_quant().disable_observer()
    scale = fq.scale.clone()
    fq(x * 10)
    assert torch.equal(fq.scale, scale) and int(fq.observer_enabled) == 0
    fq.enable_observer()
    fq(x * 10)
    sd = fq.state_dict()
    assert {"scale", "zero_point", "fake_quant_enabled", "observer_enabled", "observer.running_min"} <= set(
        sd
    )
    again = mq.FakeQuantize("minmax", backend="torch")
    again.load_state_dict(sd)
    assert torch.equal(again(x), fq(x)) and again._has_qparams
    fq.disable_fake_quant()
    again.load_state_dict(fq.state_dict())
    assert again(x) is x
    again.reset()
    assert float(again.scale) == 1.0 and not again._has_qparams


def test_per_channel_state_dict_into_a_fresh_module():
    fq = mq.FakeQuantize("per_channel", ch_axis=1, backend="torch")
    fq(torch.randn(8, 5))
    again = mq.FakeQuantize("per_channel", ch_axis=1, backend="torch")
    again.load_state_dict(fq.state_dict())
    x = torch.randn(8, 5)
    assert again.scale.shape == (5,) and torch.equal(again(x), fq(x))


def test_bad_input():
    with pytest.raises(TypeError, match="cannot observe a tensor of dtype torch.int64"):
        mq.FakeQuantize(backend="torch")(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype torch.complex64"):
        mq.FakeQuantize(backend="torch")(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="cannot use a HistogramObserver"):
        mq.FakeQuantize("kl")
    with pytest.raises(ValueError, match="an observer instance and dtype too"):
        mq.FakeQuantize(mq.MinMaxObserver(), dtype=torch.quint8)
    with pytest.raises(ValueError, match="unknown observer 'nope'"):
        mq.FakeQuantize("nope")
    with pytest.raises(ValueError, match="FP8 quantization is symmetric"):
        mq.FakeQuantize("minmax", dtype=torch.float8_e4m3fn, qscheme="affine")


def test_an_observer_instance_and_half_keep_float32_qparams():
    fq = mq.FakeQuantize(mq.MovingAverageMinMaxObserver(averaging_constant=0.5, backend="torch"))
    fq.half()
    assert fq.scale.dtype == torch.float32 and fq.observer.running_min.dtype == torch.float32
    y = fq(torch.randn(40).half())
    assert y.dtype == torch.float16


class _Net(nn.Module):
    def __init__(self, delayed):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        kw = {"backend": "torch", "delayed": bool(delayed)}
        fused = {"fused": delayed == "fused"}
        self.q1 = mq.FakeQuantize("moving_average", **kw, **fused)
        self.q2 = mq.FakeQuantize("amax_history", dtype=torch.float8_e4m3fn, history_len=4, **kw, **fused)
        self.qw = mq.FakeQuantize("per_channel", ch_axis=0, num_channels=32, qscheme="symmetric", **kw)

    def forward(self, x):
        h = torch.relu(nn.functional.linear(self.q1(x), self.qw(self.fc1.weight), self.fc1.bias))
        return self.fc2(self.q2(h))


@pytest.mark.slow
@pytest.mark.parametrize("delayed", [False, True, "fused"])
def test_compile_fullgraph_forward_and_backward_match_eager(delayed):
    torch._dynamo.reset()
    eager, fresh = _Net(delayed), _Net(delayed)
    fresh.load_state_dict(eager.state_dict())
    run = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    for x in steps((8, 16), n=3):
        ye, yc = eager(x), run(x)
        assert torch.equal(ye, yc)
        ye.sum().backward()
        yc.sum().backward()
    assert torch.equal(eager.fc1.weight.grad, fresh.fc1.weight.grad)
    for a, b in zip(eager.buffers(), fresh.buffers(), strict=True):
        assert torch.equal(a, b)


# --- the kernel against its twin (interpreter) -------------------------------------------------------------


def _fq_cases():
    x = torch.randn(3000) * 50
    x[:300] = (torch.randint(-300, 300, (300,)) + 0.5) * 0.0625
    x[300:310] = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, 3e38]
    )
    return x


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("target", [None, *FP8])
def test_kernel_matches_reference_bit_for_bit(dtype, target):
    kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    x = _fq_cases().to(dtype)
    z0 = torch.tensor(0, dtype=torch.int32)
    per_tensor = [(torch.tensor(0.0625), torch.tensor(37, dtype=torch.int32), -128, 127),
                  (torch.tensor(0.37), z0, 0, 255), (torch.tensor(1e-3), z0, -8, 7)]  # fmt: skip
    for s, z, lo, hi in per_tensor:
        args = (x, s, z if target is None else z0, lo, hi, target, None)
        (o, m), (ok, mk) = reference.fake_quantize_(*args), kernels.fake_quantize_(*args)
        assert same_bits(o, ok) and torch.equal(m, mk)
    xs = x.reshape(30, 100)
    for axis, c in ((0, 30), (1, 100)):
        s = torch.rand(c) * 0.5 + 0.01
        z = torch.zeros(c, dtype=torch.int32) if target else torch.randint(-20, 20, (c,), dtype=torch.int32)
        args = (xs, s, z, -128, 127, target, axis)
        (o, m), (ok, mk) = reference.fake_quantize_(*args), kernels.fake_quantize_(*args)
        assert same_bits(o, ok) and torch.equal(m, mk)


@pytest.mark.interpreter
@pytest.mark.parametrize("delayed", [False, True])
def test_module_backends_agree(delayed):
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    for kw in ({"observer": "moving_average"}, {"observer": "per_channel", "ch_axis": 1},
               {"observer": "amax_history", "dtype": torch.float8_e5m2, "history_len": 8}):  # fmt: skip
        a = mq.FakeQuantize(backend="torch", delayed=delayed, **kw)
        b = mq.FakeQuantize(backend="triton", delayed=delayed, **kw)
        for x in steps((40, 33), n=3, dtype=torch.bfloat16):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = a(xa), b(xb)
            assert same_bits(ya.detach(), yb.detach())
            ga, gb = torch.autograd.grad(ya.sum(), xa), torch.autograd.grad(yb.sum(), xb)
            assert same_bits(ga[0], gb[0])
        for p, q in zip(a.buffers(), b.buffers(), strict=True):
            assert torch.equal(p, q)


# --- against torch.ao --------------------------------------------------------------------------------------


def _ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import torch.ao.quantization as ao
        except ImportError:
            pytest.skip("torch.ao.quantization is not importable in this torch build")
    return ao


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_torch_aos_fake_quantize_gives_the_same_and_its_fused_module_other_symmetric_qparams(qscheme):
    ao = _ao()
    ao_qs = torch.per_tensor_affine if qscheme == "affine" else torch.per_tensor_symmetric
    ours = mq.FakeQuantize("moving_average", averaging_constant=0.1, qscheme=qscheme, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ao.FakeQuantize(ao.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                                 dtype=torch.qint8, qscheme=ao_qs, averaging_constant=0.1)  # fmt: skip
        fused = ao.FusedMovingAvgObsFakeQuantize(quant_min=-128, quant_max=127, dtype=torch.qint8,
                                                 qscheme=ao_qs, averaging_constant=0.1)  # fmt: skip
    for x in steps(n=3):
        y, yt = ours(x), theirs(x)
        fused(x)
        assert torch.equal(y, yt)
    assert torch.equal(ours.scale, theirs.scale.reshape(()))
    if qscheme == "symmetric":  # on one batch: the fused op divides the range by 127, the observers by 127.5
        x = steps(n=1)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = ao.FusedMovingAvgObsFakeQuantize(quant_min=-128, quant_max=127, dtype=torch.qint8,
                                                     qscheme=ao_qs)  # fmt: skip
        fused(x)
        ours = mq.FakeQuantize("moving_average", qscheme=qscheme, backend="torch")
        ours(x)
        amax = float(x.abs().max())
        assert float(fused.scale) == pytest.approx(amax / 127, rel=1e-6)
        assert float(ours.scale) == pytest.approx(amax / 127.5, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [{}, {"delayed": True}, {"delayed": True, "fused": True},
     {"observer": "amax_history", "dtype": torch.float8_e4m3fn, "delayed": True, "fused": True},
     {"observer": "per_channel", "ch_axis": 1, "num_channels": 256}],
)  # fmt: skip
def test_cuda_graph_replay_gives_eager_results_without_a_sync(kw):
    eager = mq.FakeQuantize(**{"observer": "moving_average", **kw}).cuda()
    graphed = mq.FakeQuantize(**{"observer": "moving_average", **kw}).cuda()
    xs = [x.cuda() for x in steps((512, 256), n=5)]
    eager(xs[0])
    static = xs[1].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (and compile the kernels) on a side stream
        graphed(static)
    torch.cuda.current_stream().wait_stream(s)
    graphed.load_state_dict(eager.state_dict())
    got, want = [], []
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = graphed(static)
        for x in xs[1:]:
            static.copy_(x)
            g.replay()
            got.append(out.clone())
            want.append(eager(x))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for a, b in zip(eager.buffers(), graphed.buffers(), strict=True):
        assert torch.equal(a, b)


# --- fused delayed step (opt-in) -------------------------------------------------------------------------

FUSED = [
    {"observer": "minmax"},
    {"observer": "moving_average", "averaging_constant": 0.2, "dtype": torch.quint8},
    {"observer": "amax_history", "dtype": torch.float8_e4m3fn, "history_len": 4},
    {"observer": "amax_history", "dtype": torch.qint8, "amax_compute_algo": "most_recent"},
]


@pytest.mark.parametrize("kw", FUSED)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fused_delayed_step_equals_the_unfused_one(kw, backend):
    if backend == "triton":
        pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    fused = mq.FakeQuantize(delayed=True, fused=True, backend=backend, **kw)
    plain = mq.FakeQuantize(delayed=True, backend="torch", **kw)
    for x in steps((50, 41), n=4, dtype=torch.bfloat16):
        x = x.clone()
        x.view(-1)[-1] = float("nan")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), plain(xb)
        assert same_bits(ya.detach(), yb.detach())
        (ga,), (gb,) = torch.autograd.grad(ya.sum(), xa), torch.autograd.grad(yb.sum(), xb)
        assert same_bits(ga, gb)
        with torch.no_grad():
            assert same_bits(fused(x), plain(x))
    for (name, a), b in zip(fused.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_fused_needs_delayed_per_tensor_and_a_named_algo():
    algo = {"amax_compute_algo": lambda h: h.max()}
    for kw in (
        {},
        {"delayed": True, "observer": "per_channel"},
        {"delayed": True, "observer": "amax_history", **algo},
    ):
        with pytest.raises(ValueError, match="fused=True fuses the delayed step"):
            mq.FakeQuantize(fused=True, **kw)


@pytest.mark.interpreter
@pytest.mark.parametrize("target", [None, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fused_kernels_match_their_twins(target, dtype):
    kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    from mono_quant.history import AmaxHistoryState
    from mono_quant.state import RangeState

    x = _fq_cases()[:300].repeat(30).to(dtype)  # 9000 values: several tiles and programs
    s, z = torch.tensor(0.25), torch.tensor(0, dtype=torch.int32)
    for c in (None, 0.5):
        got, want = RangeState.empty(), RangeState.empty()
        a = kernels.observe_fake_quantize_(x, got, c, s, z, -128, 127, target)
        b = reference.observe_fake_quantize_(x, want, c, s, z, -128, 127, target)
        assert same_bits(a[0], b[0]) and torch.equal(a[1], b[1])
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    got, want = AmaxHistoryState.empty(5), AmaxHistoryState.empty(5)
    for i in range(3):
        a = kernels.amax_history_fake_quantize_(x * i, got, "max", 2.0, 448.0, 1e-7, z, -128, 127, target)
        b = reference.amax_history_fake_quantize_(x * i, want, "max", 2.0, 448.0, 1e-7, z, -128, 127, target)
        assert same_bits(a[0], b[0]) and torch.equal(a[1], b[1])
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("kw", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_equal_the_torch_path(kw, dtype):
    for extra in ({}, {"delayed": True, "fused": True}):
        a = mq.FakeQuantize(backend="triton", **kw, **extra).cuda()
        b = mq.FakeQuantize(backend="torch", **kw, **extra).cuda()
        for x in steps((1000, 1003), n=3, dtype=dtype):
            xa, xb = x.cuda().requires_grad_(), x.cuda().requires_grad_()
            ya, yb = a(xa), b(xb)
            assert same_bits(ya.detach(), yb.detach())
            assert same_bits(torch.autograd.grad(ya.sum(), xa)[0], torch.autograd.grad(yb.sum(), xb)[0])
        for p, q in zip(a.buffers(), b.buffers(), strict=True):
            assert torch.equal(p, q)
