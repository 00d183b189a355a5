"""Min/max kernels (``mono_quant.kernels.minmax``, every kernel of ``MINMAX_KERNELS``) under the interpreter,
against the torch twin (``mono_quant.reference``) and against the float64 oracle below.

Min, max (the EMA too) and ``seen`` are compared exactly. Sizes straddle the kernels' tiles and
super-tiles; batches grow the range to the left, the right and both; NaN and +-Inf sit in chosen programs'
tiles (so that the one-launch kernel's exact re-read runs) and in the ragged tail.
"""

import math

import numpy as np
import pytest
import torch

import mono_quant
from mono_quant import reference
from mono_quant.state import RangeState

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
import triton  # noqa: E402
from mono_quant.kernels import minmax as kmm  # noqa: E402
from mono_quant.kernels import minmax_one_launch as kol  # noqa: E402
from mono_quant.kernels._common import launch_options, resident_programs  # noqa: E402


# --- the oracle: float64, a few lines, obviously right -----------------------------------------------------
def oracle_range(x: torch.Tensor, ch_axis: int | None = None):
    """Finite min and max of the float32 values of ``x`` (per channel along ``ch_axis``), and the non-finite
    count: ``(min, max, bad)`` as float64 tensors and an int (``+inf``/``-inf`` where nothing is finite)."""
    v = x.float().double()
    v = v.reshape(-1, 1) if ch_axis is None else v.movedim(ch_axis, -1).reshape(-1, x.shape[ch_axis])
    finite = torch.isfinite(v)
    mn = torch.where(finite, v, math.inf).amin(0)
    mx = torch.where(finite, v, -math.inf).amax(0)
    return mn, mx, int((~finite).sum())


def oracle_update(state: list, x: torch.Tensor, c: float | None, ch_axis: int | None = None) -> None:
    """The observer update on ``state = [running_min, running_max, seen]`` (float64 tensors and a list)."""
    mn, mx, bad = oracle_range(x, ch_axis)
    for i, cur in ((0, mn), (1, mx)):
        run = state[i]
        if c is None:
            state[i] = torch.minimum(run, cur) if i == 0 else torch.maximum(run, cur)
            continue
        new = [ema(float(r), float(v), c) for r, v in zip(run.tolist(), cur.tolist())]
        state[i] = torch.tensor(new, dtype=torch.float64)
    state[2] = [state[2][0] + x.numel() - bad, state[2][1] + bad, state[2][2] + 1, 0]


def ema(run: float, cur: float, c: float) -> float:
    """One moving-average step: start at the first finite value, keep through an all-non-finite batch; then
    torch.ao's float32 ``run + c * (cur - run)`` (``cur`` at ``c == 1``; float64 where float32 overflows)."""
    if math.isinf(run):
        return cur
    if math.isinf(cur):
        return run
    r, v, c32 = np.float32(run), np.float32(cur), np.float32(c)
    if c32 == 1:
        return cur
    with np.errstate(over="ignore"):
        out = r + c32 * (v - r)
    return float(out if math.isfinite(out) else np.float32(float(r) + float(c32) * (float(v) - float(r))))


def oracle_state(shape=()) -> list:
    size = shape[0] if shape else 1
    return [
        torch.full((size,), math.inf, dtype=torch.float64),
        torch.full((size,), -math.inf, dtype=torch.float64),
        [0, 0, 0, 0],
    ]


def assert_matches_oracle(got: RangeState, want: list) -> None:
    assert torch.equal(got.running_min.double().flatten(), want[0]), (got.running_min, want[0])
    assert torch.equal(got.running_max.double().flatten(), want[1]), (got.running_max, want[1])
    assert got.seen.tolist() == want[2]


# --------------------------------------------------------------------------------------------------------
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KERNELS = kmm.MINMAX_KERNELS
B = kmm.BLOCK
SUPER = kol.block_for(4) * kol.UNROLL  # the one-launch kernel's fp32 super-tile


def fresh(shape=()):
    return RangeState.empty(shape)


def assert_state(got, want):
    # bit for bit, the EMA too: the same float32 operations, each rounded once (no FMA: launch_options)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g, w)


def batches(n, dtype, tile=B):
    """Three batches of ``n`` values: a base, one reaching further left, one further on both sides; the
    last two hold NaN / +-Inf in tiles of chosen programs (tile 1: program 1 of the interpreter's 4;
    tile 6: program 2) and in the ragged tail."""
    out = []
    for k, (shift, scale) in enumerate(((0.0, 1.0), (-3.0, 1.0), (1.0, 5.0))):
        x = torch.randn(n) * scale + shift
        if k and n > 2:
            for pos, value in ((tile + 5, "nan"), (6 * tile + 1, "inf"), (n - 1, "-inf"), (1, "nan")):
                if pos < n:
                    x[pos] = float(value)
        out.append(x.to(dtype))
    return out


def _check(kernel, xs, c, ch_axis=None, shape=()):
    got, want, oracle = fresh(shape), fresh(shape), oracle_state(shape)
    for x in xs:
        if ch_axis is None:
            kernels.minmax_update_(x, got, c, kernel=kernel)
            reference.minmax_update_(x, want, c)
        else:
            kernels.minmax_per_channel_update_(x, ch_axis, got, c, kernel=kernel)
            reference.minmax_per_channel_update_(x, ch_axis, want, c)
        oracle_update(oracle, x, c, ch_axis)
        assert_state(got, want)
        assert_matches_oracle(got, oracle)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 7, B - 1, B + 1, 3 * B + 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [None, 0.25])
def test_minmax_matches_reference_and_oracle(kernel, n, dtype, c):
    _check(kernel, batches(n, dtype), c)


@pytest.mark.parametrize(
    "n, dtype",
    [(SUPER - 1, torch.float32), (SUPER, torch.float32), (SUPER + 1, torch.float32),
     (9 * SUPER + 1023, torch.float32), (2 * SUPER + 1, torch.bfloat16), (SUPER // 2 + 3, torch.float64)],
)  # fmt: skip
def test_one_launch_around_its_super_tile(n, dtype):
    # NaN/Inf in super-tiles 1 and 6: programs 1 and 2 re-read their tiles, the others keep their hot loop
    tile = kol.block_for(torch.empty(0, dtype=dtype).element_size()) * kol.UNROLL
    _check("one_launch", batches(n, dtype, tile), 0.1)


@pytest.mark.parametrize(
    "kernel, dtype", [(k, torch.float32) for k in KERNELS] + [("one_launch", torch.bfloat16)]
)
def test_minmax_large(kernel, dtype):
    _check(kernel, batches(200_003, dtype)[:2], 0.1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("c", [None, 0.5])
def test_all_nonfinite_batches(kernel, c):
    """A batch with nothing finite counts its values and leaves the range (and the EMA start) alone."""
    seq = [
        torch.full((5,), float("nan")),
        torch.tensor([2.0, float("inf")]),
        torch.full((SUPER + 3,), float("-inf")),
    ]
    _check(kernel, seq, c)


@pytest.mark.parametrize("kernel", KERNELS)
def test_ema_first_observation_and_float64(kernel):
    xs = (torch.tensor([-1.0, 3.0], dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 10)
    _check(kernel, xs, 0.01)
    _check(kernel, (torch.tensor([1e39, -2.0], dtype=torch.float64),), None)  # beyond float32: non-finite


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_input(kernel):
    x = torch.randn(64, 96)[:, ::3].t()
    assert not x.is_contiguous()
    _check(kernel, [x], None)


def test_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match="one_launch"):
        kernels.minmax_update_(torch.ones(3), fresh(), kernel="three_launch")


PER_CHANNEL = [
    ((37,), 0),  # 1-D: every element its own channel
    ((33, 70), -1),  # [tokens, hidden]
    ((150, 256), -1),  # [tokens, hidden]: full super-tiles of rows and a ragged tail
    ((2, 9, 130), -1),  # [batch, seq, hidden]
    ((2, 9, 130), 1),  # a middle axis
    ((2, 9, 130), 0),
    ((5, 3, 7, 9), 0),  # conv weight / NCHW along 0
    ((4, 6, 5, 5), 1),  # NCHW along channels (inner 25: masked tiles)
    ((4, 6, 8, 8), 1),  # NCHW along channels (inner 64: unmasked tiles)
    ((4, 6, 8, 8), 2),
    ((4, 6, 8, 8), 3),
    ((3, 2, 2000), 1),  # long inner rows, > 1 tile per row
]


def _channel_batches(shape, dtype):
    xs = []
    for shift in (0.0, -2.0, 4.0):
        x = torch.randn(shape) + shift
        if shift:
            x.view(-1)[::11] = float("nan")
            x.view(-1)[3::17] = float("-inf")
        xs.append(x.to(dtype))
    return xs


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape,axis,c", [(shape, axis, (None, 0.1)[i % 2]) for i, (shape, axis) in enumerate(PER_CHANNEL)]
)  # min/max and the EMA in turn
def test_per_channel_matches_reference_and_oracle(kernel, shape, axis, c):
    _check(kernel, _channel_batches(shape, torch.float32), c, axis, (shape[axis],))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape,axis", [((33, 70), -1), ((2, 9, 130), 1), ((4, 6, 8, 8), 1), ((4, 6, 5, 5), 0)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_channel_half_precision(kernel, shape, axis, dtype):
    _check(kernel, _channel_batches(shape, dtype), 0.1, axis, (shape[axis],))


@pytest.mark.parametrize("kernel", KERNELS)
def test_per_channel_nan_channel_and_noncontiguous(kernel):
    x = torch.randn(8, 40)
    x[:, 3] = float("nan")  # a channel with nothing finite stays at +-inf
    xt = x.t()  # (40, 8), channels along 0, not contiguous
    _check(kernel, [xt], None, 0, (40,))


OBSERVERS = [
    (mono_quant.MinMaxObserver, {}),
    (mono_quant.MovingAverageMinMaxObserver, {"averaging_constant": 0.2}),
    (mono_quant.PerChannelMinMaxObserver, {"ch_axis": -1}),
    (mono_quant.MovingAveragePerChannelMinMaxObserver, {"ch_axis": 1, "averaging_constant": 0.3}),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cls,kwargs", OBSERVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_observers_triton_equal_torch(kernel, cls, kwargs, dtype, monkeypatch):
    monkeypatch.setattr(kmm, "MINMAX_KERNEL", kernel)  # as MONO_QUANT_MINMAX_KERNEL would at import
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
    seen = torch.tensor([100, 7, 2, 0])
    want_min, want_max = run_min.clone(), run_max.clone()
    reference._update_range_(RangeState(want_min, want_max, seen.clone()), pmin.amin(0), pmax.amax(0), c)
    bad = int(pbad.sum())
    kmm._channel_finalize_kernel[(triton.cdiv(channels, block_c),)](
        pmin, pmax, pbad, splits, channels, run_min, run_max, seen, seen, 1000, c or 0.0, 1, 1,
        BLOCK_S=block_s, BLOCK_C=block_c, EMA=c is not None, HAS_MASK=False, **launch_options(4),
    )  # fmt: skip
    assert_state([run_min, run_max, seen], [want_min, want_max, torch.tensor([1100 - bad, 7 + bad, 3, 0])])


def test_resident_programs_follow_registers_threads_and_shared_memory():
    class H200:  # the fields torch.cuda.get_device_properties gives on an H200
        regs_per_multiprocessor = 65536
        max_threads_per_multi_processor = 2048
        shared_memory_per_multiprocessor = 233472

    assert resident_programs(32, 0, 8, H200) == 8  # threads bound: 8 x 256 = 2048
    assert resident_programs(48, 0, 8, H200) == 5  # registers: 65536 / (48 * 256)
    assert resident_programs(50, 0, 8, H200) == 4  # 50 rounds up to 56 a thread
    assert resident_programs(255, 0, 8, H200) == 1
    assert resident_programs(32, 100_000, 8, H200) == 2  # shared memory
    assert resident_programs(32, 0, 1, object()) == 32  # Hopper's limits where props lack them
