"""The range update's arithmetic on both backends: the moving average near float32's limit and with
``averaging_constant=1``, and the per-channel filtering of non-finite values in bounded memory.

The oracles come first: a few lines each, in float64 or on numpy scalars, obviously right.
"""

import math

import numpy as np
import pytest
import torch

from mono_quant import ops, reference, timing
from mono_quant.state import RangeState

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")

F32_MAX = float(np.finfo(np.float32).max)


def ema_oracle(run: float, cur: float, c: float) -> float:
    """The moving average's contract for finite float32 ``run``, ``cur``: ``c == 1`` takes ``cur``; otherwise
    torch.ao's ``run + c * (cur - run)`` in float32, or where that overflows the same in float64, rounded
    once."""
    r, v, c = np.float32(run), np.float32(cur), np.float32(c)
    if c == 1:
        return float(v)
    with np.errstate(over="ignore"):
        out = r + c * (v - r)
    if math.isinf(out):
        out = np.float32(np.float64(r) + np.float64(c) * (np.float64(v) - np.float64(r)))
    return float(out)


def finite_range_oracle(x: torch.Tensor, ch_axis: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel min and max of the finite values (float64 then float32) and the non-finite count."""
    v = x.double().movedim(ch_axis, -1).reshape(-1, x.shape[ch_axis])
    finite = torch.isfinite(v)
    mn = torch.where(finite, v, math.inf).amin(0).float()
    mx = torch.where(finite, v, -math.inf).amax(0).float()
    return mn, mx, int((~finite).sum())


@pytest.fixture(params=["torch", "torch-as-on-cuda", pytest.param("triton", marks=pytest.mark.interpreter)])
def backend(request, monkeypatch):
    """Each implementation: the torch path as on CPU (branching on values, numpy scalars) and as on CUDA
    (no host read), and the kernels under the interpreter."""
    if request.param == "torch-as-on-cuda":
        monkeypatch.setattr(reference, "_may_branch", lambda x: False)
    return request.param.split("-")[0]


def _observe(xs, c, backend, per_channel):
    shape = (xs[0].shape[-1],) if per_channel else ()
    state = RangeState.empty(shape)
    for x in xs:
        if per_channel:
            ops.minmax_per_channel_update_(x, -1, state, c, backend=backend)
        else:
            ops.minmax_update_(x, state, c, backend=backend)
    return state


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("c", [0.01, 0.5, 0.999, 1.0])
@pytest.mark.parametrize(
    "first, second",
    [(-3e38, 3e38), (F32_MAX, -F32_MAX), (-F32_MAX, F32_MAX), (2e38, -2e38)],
)
def test_ema_stays_finite_near_the_float32_limit(backend, per_channel, c, first, second):
    # the difference passes float32's max: the plain formula gave +-inf, and the next batch restarted
    state = _observe([torch.tensor([[first]]), torch.tensor([[second]])], c, backend, per_channel)
    want = ema_oracle(first, second, c)
    assert math.isfinite(want)
    assert state.running_min.flatten().tolist() == [want]
    assert state.running_max.flatten().tolist() == [want]


def _random_float32(n: int, gen: torch.Generator) -> torch.Tensor:
    """Finite float32 values of every sign and binade, the largest ones included."""
    mant = torch.rand(n, generator=gen, dtype=torch.float64) + 1.0
    exp = torch.randint(-60, 128, (n,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    x = (sign * torch.ldexp(mant, exp)).float()
    x[torch.isinf(x)] = F32_MAX
    x[:8] = torch.tensor([F32_MAX, -F32_MAX, 3e38, -3e38, 1e8, 1.0, -2e38, 0.0])
    return x


@pytest.mark.parametrize("c", [0.01, 0.3, 1.0])
def test_ema_per_channel_matches_the_oracle_bit_for_bit(backend, c):
    # one channel per (run, cur) pair: where the formula does not overflow this is torch.ao's result, bit
    # for bit; where it does, the float64 one
    gen = torch.Generator().manual_seed(1)
    run, cur = _random_float32(2048, gen), _random_float32(2048, gen).flip(0)
    state = _observe([run[None], cur[None]], c, backend, per_channel=True)
    want = torch.tensor([ema_oracle(r, v, c) for r, v in zip(run.tolist(), cur.tolist())])
    assert torch.isfinite(state.running_min).all()
    assert torch.equal(state.running_min, want) and torch.equal(state.running_max, want)


@pytest.mark.parametrize("c", [0.01, 0.3])
def test_ema_per_tensor_matches_the_oracle_bit_for_bit(backend, c):
    gen = torch.Generator().manual_seed(2)
    for r, v in zip(_random_float32(16, gen).tolist(), _random_float32(16, gen).flip(0).tolist()):
        state = _observe([torch.tensor([r]), torch.tensor([v])], c, backend, per_channel=False)
        assert state.running_min.item() == ema_oracle(r, v, c) == state.running_max.item(), (r, v)


@pytest.mark.parametrize("per_channel", [False, True])
def test_averaging_constant_one_is_the_last_batch(backend, per_channel):
    # 1 - 1e8 rounds to -1e8 in float32, so run + (cur - run) gave 0
    xs = [torch.tensor([[1e8, 2e8]]), torch.tensor([[1.0, 2.0]])]
    if per_channel:
        xs = [x.t() for x in xs]  # one channel, two values
    state = _observe(xs, 1.0, backend, per_channel)
    assert state.running_min.flatten().tolist() == [1.0] and state.running_max.flatten().tolist() == [2.0]
    # a batch with nothing finite still leaves the range as it was
    nan = torch.full_like(xs[0], float("nan"))
    state = _observe([*xs, nan], 1.0, backend, per_channel)
    assert state.running_min.flatten().tolist() == [1.0] and state.seen.tolist() == [4, 2, 3, 0]


SHAPES = [
    ((37,), 0),  # 1-D: every element its own channel, split along the channels
    ((33, 70), -1),
    ((33, 70), 0),
    ((2, 9, 130), 0),
    ((2, 9, 130), 1),
    ((2, 9, 130), 2),
    ((5, 3, 7, 9), 0),
    ((5, 3, 7, 9), 1),
    ((5, 3, 7, 9), 3),
    ((3, 200), 1),  # a row longer than a piece: split along the channels
]


@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_channel_filtering_in_pieces(shape, axis, dtype, monkeypatch):
    monkeypatch.setattr(reference, "FILTER_CHUNK", 50)  # many pieces, of every kind
    x = torch.randn(shape)
    x.view(-1)[::13] = float("nan")
    x.view(-1)[5::29] = float("inf")
    x.view(-1)[7::31] = float("-inf")
    x = x.to(dtype)
    last = x.dim() - 1
    swapped = {0: last, last: 0}.get(axis % x.dim(), axis % x.dim())  # the axis after transpose(0, -1)
    for xt, ax in ((x, axis), (x.transpose(0, -1), swapped)):  # contiguous and not
        mn, mx, bad = reference.finite_minmax_per_channel(xt, ax)
        want_mn, want_mx, want_bad = finite_range_oracle(xt, ax)
        assert torch.equal(mn, want_mn) and torch.equal(mx, want_mx) and int(bad) == want_bad


@pytest.mark.parametrize(
    "dtype, shape, axis, piece",
    [
        (torch.float32, (4096, 4096), -1, None),  # [tokens, hidden], 64 MiB, the default piece size
        (torch.bfloat16, (4, 512, 4096), -1, 1 << 18),  # [batch, seq, hidden]
        (torch.float32, (4, 64, 128, 128), 1, 1 << 18),  # NCHW along the channels
    ],
)
def test_per_channel_nonfinite_input_is_not_copied(dtype, shape, axis, piece, monkeypatch):
    # one NaN: the filtering used to hold a filtered copy and masks of the whole input (2.5x the input
    # for fp32, 5x for bf16); in pieces it stays near 13 bytes a value of a piece whatever the size
    if piece:
        monkeypatch.setattr(reference, "FILTER_CHUNK", piece)  # smaller inputs, the same bound
    x = torch.randn(shape).to(dtype)
    x.view(-1)[x.numel() // 3] = float("nan")
    assert x.nbytes == (64 << 20 if piece is None else 16 << 20)
    state = RangeState.empty((shape[axis],))
    peak = timing.peak_extra_bytes(lambda: reference.minmax_per_channel_update_(x, axis, state), "cpu")
    assert peak < x.nbytes // 4, peak
    assert state.seen.tolist() == [x.numel() - 1, 1, 1, 0]
