"""AmaxHistoryObserver: the three steps against an independent replay, the kernel against its torch twin
under the interpreter (bit for bit), bad input, state, merges.

The oracle below re-implements TransformerEngine's delayed scaling from the issue's description alone:
Python floats for the amaxes, a Python list for the history, and the scale as the float32 nearest to the
exact quotient (``fractions``), so it shares no code and no rounding path with the observer.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from spawn_ranks import run_ranks

import mono_quant as mq
from mono_quant.history import AmaxHistoryState

F32_MAX = float(np.finfo(np.float32).max)
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def nearest_f32(q: Fraction) -> float:
    """The float32 nearest to ``q`` (ties to even), ``inf`` past the float32 range."""
    c = np.float32(float(q))
    best = None
    for cand in (np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))):
        if not np.isfinite(cand):
            continue
        err = abs(Fraction(float(cand)) - q)
        key = (err, int(np.float32(cand).view(np.int32)) & 1)
        if best is None or key < best[0]:
            best = (key, float(cand))
    if q > Fraction(F32_MAX) + Fraction(F32_MAX) * Fraction(1, 2**25):  # beyond max + half an ulp
        return math.inf
    return best[1]


class Oracle:
    """The issue's three steps, over Python numbers."""

    def __init__(self, history_len, algo, margin, divisor, eps):
        self.h = [0.0] * history_len
        self.algo, self.margin, self.divisor = algo, margin, divisor
        self.eps = float(np.float32(eps))
        self.scale = 1.0

    def step(self, x: torch.Tensor) -> None:
        v = x.double().flatten().tolist()
        # the float32 values (float64 beyond float32's range becomes inf), finite ones only
        v = [float(np.float32(t)) for t in v]
        finite = [abs(t) for t in v if math.isfinite(t)]
        a = max(finite, default=0.0)
        self.h = [a, *self.h[:-1]]
        amax = (
            max(self.h)
            if self.algo == "max"
            else self.h[0]
            if self.algo == "most_recent"
            else self.algo(self.h)
        )
        if amax > 0 and math.isfinite(amax):
            s = nearest_f32(Fraction(amax) * 2**self.margin / Fraction(self.divisor))
            self.scale = min(max(s, self.eps), F32_MAX)


def batches(kind: str):
    """Sequences with zeros, NaN batches, Inf and values at and past float32's limits."""
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(300, generator=g) * s for s in (1.0, 4.0, 0.5, 2.0)]
    if kind == "specials":
        out[1] = torch.zeros(50)
        out[2] = torch.full((40,), float("nan"))
        out.insert(3, torch.tensor([float("inf"), -3.0, float("nan")]))
        out.append(torch.tensor([1e39, -2.5], dtype=torch.float64))  # 1e39 is past float32: non-finite
        out.append(torch.tensor([-F32_MAX, 1.0]))
        out.append(torch.tensor([1e-30, -1e-35]))  # a tiny amax: the scale is eps
        out.append(torch.randn(70, generator=g))
    return out


@pytest.mark.parametrize("kind", ["plain", "specials"])
@pytest.mark.parametrize("algo", ["max", "most_recent", "callable"])
@pytest.mark.parametrize("margin", [0, 3, 120])
@pytest.mark.parametrize("history_len", [1, 3, 16])
def test_replay_matches_the_independent_oracle(kind, algo, margin, history_len):
    fn = (lambda h: h[:2].mean()) if algo == "callable" else algo
    oracle_fn = lambda h: float(np.float32(np.float32(sum(h[:2])) / np.float32(len(h[:2]))))
    dtype = torch.float8_e4m3fn
    obs = mq.AmaxHistoryObserver(history_len, fn, margin, dtype=dtype, backend="torch")
    ref = Oracle(history_len, oracle_fn if algo == "callable" else algo, margin, 448.0, obs.eps)
    for x in batches(kind):
        before = float(obs.scale)
        obs(x)
        ref.step(x)
        assert obs.amax_history.tolist() == pytest.approx(ref.h, abs=0, rel=0)
        assert float(obs.scale) == ref.scale, (x, ref.h)
        assert float(obs.delayed_scale) == before


@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint8, torch.int4])
def test_integer_dtypes_take_the_symmetric_formula(dtype):
    obs = mq.AmaxHistoryObserver(8, dtype=dtype, backend="torch")
    x = torch.randn(1000) * 3
    obs(x)
    scale, zp = obs.calculate_qparams()
    want_s, want_z = mq.calculate_qparams(x.min(), x.max(), mq.QuantSpec(dtype, "symmetric"))
    assert torch.equal(scale, want_s) and torch.equal(zp, want_z)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_scale_is_the_spec_formula(dtype):
    obs = mq.AmaxHistoryObserver(4, margin=2, dtype=dtype, backend="torch")
    x = torch.randn(999) * 7
    obs(x)
    want, _ = mq.calculate_qparams(x.min(), x.max(), mq.QuantSpec(dtype, margin=2))
    assert torch.equal(obs.calculate_qparams()[0], want)


# --- the kernel against its twin (interpreter) ----------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("history_len", [1, 5, 1024, 1500])
@pytest.mark.parametrize("algo", ["max", "most_recent", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kernel_matches_reference_bit_for_bit(history_len, algo, dtype):
    kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    from mono_quant import reference

    got, want = AmaxHistoryState.empty(history_len), AmaxHistoryState.empty(history_len)
    seq = batches("specials") + [torch.randn(4096 * 3 + 17) * 9]
    for x in seq:
        x = x.to(dtype) if x.dtype != torch.float64 or dtype == torch.float64 else x.to(dtype)
        kernels.amax_history_update_(x, got, algo, 8.0, 448.0, 1e-12)
        reference.amax_history_update_(x, want, algo, 8.0, 448.0, 1e-12)
        for name, g, w in zip(AmaxHistoryState._fields, got, want, strict=True):
            assert torch.equal(g, w), (name, g, w)
    assert int(got.ticket) == 0


@pytest.mark.interpreter
def test_observer_backends_agree_on_a_callable_and_integers():
    pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
    for kw in ({"amax_compute_algo": lambda h: h.amax() * 0.5}, {"dtype": torch.quint8}):
        a = mq.AmaxHistoryObserver(6, backend="torch", **kw)
        b = mq.AmaxHistoryObserver(6, backend="triton", **kw)
        for x in batches("specials"):
            a(x)
            b(x)
        for name in AmaxHistoryState._fields:
            assert torch.equal(getattr(a, name), getattr(b, name)), name


# --- interface, bad input, state -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"history_len": 0}, "history_len=0 must be an int >= 1"),
        ({"history_len": 2.0}, "history_len=2.0"),
        ({"history_len": True}, "history_len=True"),
        ({"amax_compute_algo": "mean"}, "amax_compute_algo='mean' is not one of 'max', 'most_recent'"),
        ({"margin": -1}, "margin=-1 must be an int from 0 to 127"),
        ({"margin": 1.5}, "margin=1.5"),
        ({"margin": 128}, "margin=128"),
        ({"qscheme": "affine"}, "qscheme='affine'"),
        ({"dtype": torch.qint8, "margin": 2}, "margin=2 is for the FP8 dtypes"),
    ],
)
def test_bad_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mq.AmaxHistoryObserver(**kwargs)


def test_a_callable_returning_a_non_scalar_is_refused():
    obs = mq.AmaxHistoryObserver(4, amax_compute_algo=lambda h: h[:2], backend="torch")
    with pytest.raises(ValueError, match=r"must return a float tensor with one element.*shape \(2,\)"):
        obs(torch.randn(10))
    obs = mq.AmaxHistoryObserver(4, amax_compute_algo=lambda h: 3.0, backend="torch")
    with pytest.raises(ValueError, match="got 3.0"):
        obs(torch.randn(10))


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64])
def test_integer_and_complex_inputs_are_type_errors(dtype):
    with pytest.raises(TypeError, match="cannot observe a tensor of dtype"):
        mq.AmaxHistoryObserver(backend="torch")(torch.zeros(3, dtype=dtype))


def test_factory_state_dict_reset_and_qparams():
    obs = mq.create_observer("amax_history", history_len=8, margin=1)
    assert type(obs) is mq.AmaxHistoryObserver and obs.margin == 1
    with pytest.raises(RuntimeError, match="observed no data"):
        obs.calculate_qparams()
    for s in (1.0, 3.0, 2.0):
        obs(torch.randn(100) * s)
    sd = obs.state_dict()
    assert "ticket" not in sd and sd["amax_history"].shape == (8,)
    again = mq.create_observer("amax_history", history_len=8, margin=1)
    again.load_state_dict(sd)
    for name in ("amax_history", "scale", "delayed_scale", "seen"):
        assert torch.equal(getattr(again, name), getattr(obs, name))
    assert torch.equal(again.delayed_qparams()[0], obs.delayed_scale)
    with pytest.raises(ValueError, match=r"amax_history of shape \(8,\)"):
        mq.AmaxHistoryObserver(history_len=4, margin=1).load_state_dict(sd)
    obs.reset()
    assert float(obs.scale) == 1.0 and float(obs.amax_history.abs().sum()) == 0.0


def test_merge_takes_the_elementwise_max_and_recomputes_the_scale():
    a, b = mq.AmaxHistoryObserver(4, backend="torch"), mq.AmaxHistoryObserver(4, backend="torch")
    for s in (1.0, 5.0):
        a(torch.randn(200) * s)
    for s in (3.0, 1.0):
        b(torch.randn(200) * s)
    assert bool(
        (a.amax_history[:2] > b.amax_history[:2]).any() & (a.amax_history[:2] < b.amax_history[:2]).any()
    )
    merged = mq.merge_observers([a, b])
    assert torch.equal(merged.amax_history, torch.maximum(a.amax_history, b.amax_history))
    want = mq.calculate_qparams(-merged.amax_history.max(), merged.amax_history.max(), a.spec)[0]
    assert torch.equal(merged.scale, want)
    assert torch.equal(merged.seen, a.seen + b.seen)


def test_compile_fullgraph():
    torch._dynamo.reset()
    eager = mq.AmaxHistoryObserver(8, backend="torch")
    fresh = mq.AmaxHistoryObserver(8, backend="torch")
    run = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    for s in (1.0, 3.0, 0.5):
        x = torch.randn(64) * s
        run(x)
        eager(x)
    for name in ("amax_history", "scale", "delayed_scale", "seen"):
        assert torch.equal(getattr(fresh, name), getattr(eager, name)), name


# --- reduce_amax across ranks (gloo, 2 processes) ---------------------------------------------------------


def _batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(257, generator=g) * (1 + 3 * ((step + rank) % 2))
    if step == 2 and rank == 0:
        x[:] = float("nan")  # a rank with nothing finite this step
    return x


def _reduce_rank(rank: int, world: int) -> dict:
    """One rank: an observer that reduces the amax across ranks and one synced after every step."""
    reduced = mq.AmaxHistoryObserver(4, reduce_amax=True, backend="torch")
    synced = mq.AmaxHistoryObserver(4, backend="torch")
    for step in range(5):
        reduced(_batch(step, rank))
        synced(_batch(step, rank))
        mq.sync_observers(synced)
    return {n: (getattr(reduced, n).clone(), getattr(synced, n).clone()) for n in ("amax_history", "scale")}


@pytest.mark.slow
def test_reduce_amax_and_a_sync_every_step_are_transformer_engines_reduce_amax(tmp_path):
    world = 2
    ranks = run_ranks(world, _reduce_rank, tmp_path, __name__)
    # one process that saw every rank's batch of each step
    one = mq.AmaxHistoryObserver(4, backend="torch")
    for step in range(5):
        one(torch.cat([_batch(step, r) for r in range(world)]))
    for out in ranks:
        for name, (reduced, synced) in out.items():
            assert torch.equal(reduced, getattr(one, name)) and torch.equal(synced, getattr(one, name)), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_one_launch_is_sync_free_graph_safe_and_equals_the_torch_path(dtype):
    xs = [x.to(dtype).cuda() for x in batches("specials")] + [torch.randn(5_000_003, device="cuda").to(dtype)]
    eager = mq.AmaxHistoryObserver(1024, backend="triton").cuda()
    twin = mq.AmaxHistoryObserver(1024, backend="torch").cuda()
    graphed = mq.AmaxHistoryObserver(1024, backend="triton").cuda()
    static = torch.zeros_like(xs[-1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graphed(static)  # compile the kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graphed.reset()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graphed(static)
        for x in xs[-1:] * 3:
            eager(x)
            static.copy_(x)
            g.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for x in xs[-1:] * 3:
        twin(x)
    for name in AmaxHistoryState._fields:
        assert torch.equal(getattr(eager, name), getattr(twin, name)), name
        assert torch.equal(getattr(graphed, name), getattr(twin, name)), name
    for x in xs[:-1]:  # zeros, NaN, Inf, float32's limits
        eager(x)
        twin(x)
    for name in AmaxHistoryState._fields:
        assert torch.equal(getattr(eager, name), getattr(twin, name)), name
