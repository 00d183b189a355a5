"""Min/max kernels (``mono_quant.kernels.minmax``) against ``mono_quant.reference`` under the interpreter.

Min, max (the EMA too) and ``seen`` are compared exactly. Sizes straddle the kernel's tile
(``BLOCK``); batches grow the range to the left, the right and both; NaN and +-Inf are mixed in.
"""

import pytest
import torch

import mono_quant
from mono_quant import reference
from mono_quant.state import RangeState

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
import triton  # noqa: E402
from mono_quant.kernels import minmax as kmm  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
B = kmm.BLOCK


def fresh(shape=()):
    return RangeState.empty(shape)


def assert_state(got, want, ema=None):
    # bit for bit, the EMA too: the same float32 operations, each rounded once (no FMA: launch_options)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g, w)


def batches(n, dtype):
    """Three batches of ``n`` values: a base, one reaching further left, one further on both sides."""
    out = []
    for shift, scale in ((0.0, 1.0), (-3.0, 1.0), (1.0, 5.0)):
        x = torch.randn(n) * scale + shift
        if n > 2:
            x[:: max(n // 7, 2)] = float("nan")
            x[1] = float("inf")
            x[-1] = float("-inf")
        out.append(x.to(dtype))
    return out


@pytest.mark.parametrize("n", [1, 2, 7, B - 1, B, B + 1, 3 * B + 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [None, 0.25])
def test_minmax_matches_reference(n, dtype, c):
    got, want = fresh(), fresh()
    for x in batches(n, dtype):
        kernels.minmax_update_(x, got, c)
        reference.minmax_update_(x, want, c)
        assert_state(got, want, c is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minmax_large(dtype):
    got, want = fresh(), fresh()
    for x in batches(200_003, dtype)[:2]:
        kernels.minmax_update_(x, got, 0.1)
        reference.minmax_update_(x, want, 0.1)
    assert_state(got, want, ema=True)


@pytest.mark.parametrize("c", [None, 0.5])
def test_all_nonfinite_batches(c):
    """A batch with nothing finite counts its values and leaves the range (and the EMA start) alone."""
    got, want = fresh(), fresh()
    seq = [
        torch.full((5,), float("nan")),
        torch.tensor([2.0, float("inf")]),
        torch.full((B + 3,), float("-inf")),
    ]
    for x in seq:
        kernels.minmax_update_(x, got, c)
        reference.minmax_update_(x, want, c)
        assert_state(got, want, c is not None)
    assert got[0].item() == 2.0 and got[2].tolist() == [1, 5 + 1 + B + 3, 3]


def test_ema_first_observation_and_float64():
    got, want = fresh(), fresh()
    for x in (torch.tensor([-1.0, 3.0], dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 10):
        kernels.minmax_update_(x, got, 0.01)
        reference.minmax_update_(x, want, 0.01)
        assert_state(got, want, ema=True)
    assert fresh()[0].isinf()  # sanity of the helper


def test_non_contiguous_input():
    x = torch.randn(64, 96)[:, ::3].t()
    assert not x.is_contiguous()
    got, want = fresh(), fresh()
    kernels.minmax_update_(x, got)
    reference.minmax_update_(x, want)
    assert_state(got, want, ema=False)


PER_CHANNEL = [
    ((37,), 0),  # 1-D: every element its own channel
    ((33, 70), -1),  # [tokens, hidden]
    ((2, 9, 130), -1),  # [batch, seq, hidden]
    ((2, 9, 130), 1),  # a middle axis
    ((5, 3, 7, 9), 0),  # conv weight / NCHW along 0
    ((4, 6, 5, 5), 1),  # NCHW along channels
    ((3, 2, 2000), 1),  # long inner rows, > 1 tile per row
]


@pytest.mark.parametrize("shape,axis", PER_CHANNEL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [None, 0.1])
def test_per_channel_matches_reference(shape, axis, dtype, c):
    channels = shape[axis]
    got, want = fresh((channels,)), fresh((channels,))
    for shift in (0.0, -2.0, 4.0):
        x = torch.randn(shape) + shift
        x.view(-1)[::11] = float("nan")
        x.view(-1)[3::17] = float("-inf")
        x = x.to(dtype)
        kernels.minmax_per_channel_update_(x, axis, got, c)
        reference.minmax_per_channel_update_(x, axis, want, c)
        assert_state(got, want, c is not None)


def test_per_channel_nan_channel_and_noncontiguous():
    x = torch.randn(8, 40)
    x[:, 3] = float("nan")  # a channel with nothing finite stays at +-inf
    xt = x.t()  # (40, 8), channels along 0, not contiguous
    got, want = fresh((40,)), fresh((40,))
    kernels.minmax_per_channel_update_(xt, 0, got)
    reference.minmax_per_channel_update_(xt, 0, want)
    assert_state(got, want, ema=False)
    assert got[0][3].isinf() and got[2].tolist() == [8 * 39, 8, 1]


OBSERVERS = [
    (mono_quant.MinMaxObserver, {}),
    (mono_quant.MovingAverageMinMaxObserver, {"averaging_constant": 0.2}),
    (mono_quant.PerChannelMinMaxObserver, {"ch_axis": -1}),
    (mono_quant.MovingAveragePerChannelMinMaxObserver, {"ch_axis": 1, "averaging_constant": 0.3}),
]


@pytest.mark.parametrize("cls,kwargs", OBSERVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observers_triton_equal_torch(cls, kwargs, dtype):
    tri, ref = cls(backend="triton", **kwargs), cls(backend="torch", **kwargs)
    data = [torch.randn(3, 5, 24) * s + o for s, o in ((1, 0), (2, -1), (0.5, 3))]
    data[1][0, 0, 0] = float("nan")
    data.insert(1, torch.empty(0, 5, 24))  # empty: skipped by the observer before any kernel
    for x in data:
        x = x.to(dtype)
        assert tri(x) is x and ref(x) is x
    for (name, g), (_, w) in zip(tri.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(g, w, rtol=2e-7, atol=0, msg=name)
    for g, w in zip(tri.calculate_qparams(), ref.calculate_qparams(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
    assert int(tri.seen[2]) == 3


@pytest.mark.parametrize(
    "splits, channels, block_s, block_c", [(37, 300, 8, 128), (5, 3, 16, 4), (1, 1, 2, 1)]
)
@pytest.mark.parametrize("c", [None, 0.25])
def test_channel_finalize_reduces_every_split(splits, channels, block_s, block_c, c):
    # on CUDA the partials have ~100 splits, read in [BLOCK_S, BLOCK_C] tiles with a ragged last one; the
    # interpreter's few programs never make more than one tile, so the kernel is driven here directly
    pmin = torch.randn(splits, channels) - 1
    pmax = torch.randn(splits, channels) + 1
    pmin[0, 0], pmax[-1, -1] = float("inf"), float("-inf")  # a split with nothing finite in a channel
    pbad = torch.randint(0, 5, (splits, channels))
    run_min, run_max = torch.randn(channels) - 0.5, torch.randn(channels) + 0.5
    run_min[-1] = float("inf")  # a channel never seen before: the EMA starts from the batch
    seen = torch.tensor([100, 7, 2])
    want_min, want_max = run_min.clone(), run_max.clone()
    reference._update_range_(RangeState(want_min, want_max, seen.clone()), pmin.amin(0), pmax.amax(0), c)
    bad = int(pbad.sum())
    kmm._channel_finalize_kernel[(triton.cdiv(channels, block_c),)](
        pmin, pmax, pbad, splits, channels, run_min, run_max, seen, 1000, c or 0.0,
        BLOCK_S=block_s, BLOCK_C=block_c, EMA=c is not None, **kmm.launch_options(4),
    )  # fmt: skip
    assert_state([run_min, run_max, seen], [want_min, want_max, torch.tensor([1100 - bad, 7 + bad, 3])])
