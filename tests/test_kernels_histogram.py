"""Histogram kernels (``mono_quant.kernels.histogram``) against the reference, under the interpreter.

Everything is compared exactly: running min/max, ``seen``, the grid (exponent, origin) and the int64
counts, after every batch, for each binning strategy the interpreter runs. Batches grow the range left,
right and both, mix in NaN/+-Inf, hold only non-finite values, tiny (subnormal) values, or stay inside
the grid (the steady state, where the grid must not move).
"""

import pytest
import torch

import mono_quant
from mono_quant import reference
from mono_quant.grid import internal_bins
from mono_quant.state import HistogramState

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
from mono_quant.kernels import histogram as khist  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

NAMES = HistogramState._fields


def fresh(bins):
    return HistogramState.empty(internal_bins(bins))


def check_sequence(seq, bins, dtype, strategy):
    got, want = fresh(bins), fresh(bins)
    for i, x in enumerate(seq):
        x = x.to(dtype)
        khist.histogram_update_(x, got, strategy=strategy)
        reference.histogram_update_(x, want)
        for name, g, w in zip(NAMES, got, want, strict=True):
            assert torch.equal(g, w), f"batch {i}, {name}: {g} != {w}"
    return got


def growing(n):
    """Batches that start the grid, grow it right, left, both, then a steady one inside it."""
    base = torch.randn(n)
    if n > 3:
        base[::5] = float("nan")
        base[2] = float("-inf")
    return [base, torch.rand(n) * 3 + 2, -torch.rand(n) * 7 - 1, torch.randn(n) * 40, torch.randn(n)]


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, khist.BLOCK + 1])
def test_growing_range(strategy, dtype, n):
    check_sequence(growing(n), 64, dtype, strategy)


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
@pytest.mark.parametrize("bins", [1, 2048])
def test_sizes_and_bins(strategy, bins):
    seq = [torch.randn(khist.BLOCK - 1), torch.randn(khist.BLOCK) * 3, torch.randn(2 * khist.BLOCK + 3) - 5]
    check_sequence(seq, bins, torch.float32, strategy)


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
def test_large_batch_then_steady_state(strategy):
    x = torch.randn(150_001) * 3
    state = check_sequence([x, x[:9000] * 0.5], 256, torch.bfloat16, strategy)
    assert int(state[5].sum()) == 150_001 + 9000


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
def test_special_values(strategy):
    """Nothing finite, zeros only, subnormals (the negative-underflow fix), huge magnitudes."""
    seq = [
        torch.full((4,), float("nan")),
        torch.zeros(3),
        torch.tensor([1e-40, -1e-42, 0.0, -0.0]),
        torch.tensor([1.0e6, 1.0e6 + 0.0625, float("inf")]),
        torch.tensor([-3.0e38, 3.0e38]),
    ]
    got = check_sequence(seq, 16, torch.float32, strategy)
    assert got[2].tolist() == [3 + 4 + 2 + 2, 4 + 1, 5]


def test_steady_state_keeps_grid():
    got = fresh(128)
    khist.histogram_update_(torch.linspace(-4, 4, 1001), got)
    grid = (got[3].clone(), got[4].clone())
    khist.histogram_update_(torch.linspace(-3, 3, 999), got)
    assert torch.equal(got[3], grid[0]) and torch.equal(got[4], grid[1])
    assert int(got[5].sum()) == 2000


@pytest.mark.parametrize("method", ["kl", "percentile"])
def test_observer_triton_equal_torch(method):
    kw = {"bins": 128, "method": method}
    tri = mono_quant.HistogramObserver(backend="triton", **kw)
    ref = mono_quant.HistogramObserver(backend="torch", **kw)
    for x in (torch.randn(2, 300), torch.empty(0), torch.randn(4, 50) * 3 - 1, torch.rand(999)):
        tri(x)
        ref(x)
    for (name, g), (_, w) in zip(tri.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(g, w), name
    for g, w in zip(tri.calculate_qparams(), ref.calculate_qparams(), strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("strategy", khist.HIST_STRATEGIES)
def test_float64_beyond_float32_and_tiny_negatives(strategy):
    # float64 is observed as its float32 values: 1e300 becomes inf (non-finite), -1e-50 becomes -0.0
    seq = [
        torch.tensor([1e300, -1e-50, 1000.0, 5.0, -1e300], dtype=torch.float64),
        torch.randn(3000, dtype=torch.float64) * 1e3,
        torch.tensor([-1e-50, float("nan"), 2.5], dtype=torch.float64),
    ]
    state = check_sequence(seq, 8, torch.float64, strategy)
    seen = state[2]
    assert seen.tolist() == [3 + 3000 + 2, 2 + 1, 3]
    assert int(state[5].sum()) == int(seen[0])


def test_strategy_from_environment(monkeypatch):
    monkeypatch.delenv("MONO_QUANT_HIST_STRATEGY", raising=False)
    assert khist._default_strategy() == "histc"
    monkeypatch.setenv("MONO_QUANT_HIST_STRATEGY", " TL_Histogram ")
    assert khist._default_strategy() == "tl_histogram"
    monkeypatch.setenv("MONO_QUANT_HIST_STRATEGY", "smem")
    with pytest.raises(ValueError, match="'smem' is not one of histc, atomic, tl_histogram"):
        khist._default_strategy()
    with pytest.raises(ValueError, match="strategy='mma' is not one of"):
        khist.histogram_update_(torch.randn(10), fresh(16), strategy="mma")


def test_histc_binning_in_chunks(monkeypatch):
    """The ``"histc"`` binning counts ``HISTC_CHUNK`` values per ``torch.histc`` call (its float32 counts
    stay exact): with small chunks, batches of several chunks and a ragged last one count every value."""
    monkeypatch.setattr(khist, "HISTC_CHUNK", 1000)
    x = torch.randn(4097) * 5
    x[999:1001] = float("nan")  # across a chunk boundary
    state = check_sequence([x, torch.rand(2500) * 40 - 20, x[:1000]], 2048, torch.bfloat16, "histc")
    assert int(state[5].sum()) == 4095 + 2500 + 999


def test_deterministic_mode_bins_without_histc(monkeypatch):
    # torch.histc on CUDA refuses deterministic mode: the same exact counts come from the atomic binning
    def refuse(*args):
        raise AssertionError("torch.histc used in deterministic mode")

    monkeypatch.setattr(khist, "_histc_counts_", refuse)
    monkeypatch.setattr(khist, "HIST_STRATEGY", "histc")
    torch.use_deterministic_algorithms(True)
    try:
        check_sequence(growing(300), 64, torch.float32, None)
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(AssertionError, match="histc used"):
        check_sequence(growing(300), 64, torch.float32, None)
