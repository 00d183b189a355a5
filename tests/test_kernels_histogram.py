"""Histogram kernels (``mono_quant.kernels.histogram``) against the reference and a float64 oracle, under
the interpreter.

Compared exactly after every batch: running min/max, ``seen``, the grid (exponent, origin) and the int64
counts. Batches grow the range left, right and both, hold NaN/+-Inf in chosen programs' tiles and in the
ragged tail, values on bin edges, tiny negatives, values whose ``|x * 2**-e|`` is near ``2**24``,
concentrated data, the largest bin counts, and force the one-read binnings' side buffer to overflow.
In the interpreter the ``"smem_rows"`` and ``"smem_atomic"`` binnings run their kernels with the scratch
twin of the shared-memory counters (same slots), so the index arithmetic checked here is the one the GPU
runs.
"""

import math

import pytest
import torch

import mono_quant
from mono_quant import reference
from mono_quant.grid import MAX_BINS, internal_bins
from mono_quant.state import HistogramState

kernels = pytest.importorskip("mono_quant.kernels", reason="triton is not installed")
from mono_quant.kernels import _smem  # noqa: E402
from mono_quant.kernels import histogram as khist  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def oracle(batches, bins):
    """float64: the grid of every finite float32 value seen, and each value's bin by floor division."""
    v = torch.cat([b.reshape(-1).float().double() for b in batches])
    v, num_bins = v[torch.isfinite(v)], internal_bins(bins)
    if v.numel() == 0:
        return -126, 0, torch.zeros(num_bins, dtype=torch.int64)
    lo, hi = v.min().item(), v.max().item()
    floor = math.frexp(max(abs(lo), abs(hi)))[1] - 1 - 23  # the float32 spacing at the largest |x|
    e = next(
        e for e in range(-126, 127) if e >= floor and math.floor(hi / 2**e) - math.floor(lo / 2**e) < num_bins
    )
    origin = math.floor(lo / 2**e)
    return e, origin, torch.bincount((v / 2.0**e).floor().long() - origin, minlength=num_bins)


NAMES = HistogramState._fields
ONE_READ = ("smem_rows", "smem_atomic", "tl_histogram", "atomic")
TILE = khist.PASS_BLOCK
PROGRAMS = 4  # the interpreter's (kernels._common.INTERPRETER_PROGRAMS): tile t belongs to program t % 4


def fresh(bins):
    return HistogramState.empty(internal_bins(bins))


def check_sequence(seq, bins, dtype, strategy):
    """Each batch through the kernels and the twin: equal after every batch, and equal to the oracle."""
    got, want = fresh(bins), fresh(bins)
    seq = [x.to(dtype) for x in seq]
    for i, x in enumerate(seq):
        khist.histogram_update_(x, got, strategy=strategy)
        reference.histogram_update_(x, want)
        for name, g, w in zip(NAMES, got, want, strict=True):
            assert torch.equal(g, w), f"batch {i}, {name}: {g} != {w}"
    e, origin, counts = oracle(seq, bins)
    assert (int(got.exponent), int(got.origin)) == (e, origin)
    assert torch.equal(got.counts, counts)
    return got


def growing(n):
    """Batches that start the grid, grow it right, left, both, then a steady one inside it."""
    base = torch.randn(n)
    if n > 3:
        base[::5] = float("nan")
        base[2] = float("-inf")
    return [base, torch.rand(n) * 3 + 2, -torch.rand(n) * 7 - 1, torch.randn(n) * 40, torch.randn(n)]


def tiles(*values_per_tile, n_tiles, tail=0, fill=0.5):
    """``n_tiles`` full tiles and a tail of ``tail`` values, all ``fill``, with ``{tile: values}`` placed."""
    x = torch.full((n_tiles * TILE + tail,), fill)
    for where in values_per_tile:
        for t, vals in where.items():
            x[t * TILE : t * TILE + len(vals)] = torch.tensor(vals)
    return x


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.parametrize(
    "strategy,dtype",
    [("smem_rows", d) for d in DTYPES] + [(s, torch.bfloat16) for s in (*ONE_READ[1:], "histc")],
)
def test_growing_range(strategy, dtype):
    check_sequence(growing(3 * TILE + 5), 64, dtype, strategy)


@pytest.mark.parametrize("n", [1, 7, TILE - 1, TILE, TILE + 1, 5 * TILE + 3])
def test_sizes(n):
    check_sequence(growing(n), 128, torch.float32, "smem_rows")


def test_large_batch_then_steady_state():
    x = torch.randn(150_003) * 3
    state = check_sequence([x, x[:9000] * 0.5, x[5:60_000]], 2048, torch.bfloat16, "smem_rows")
    assert int(state.counts.sum()) == 150_003 + 9000 + 59_995


@pytest.mark.parametrize("strategy", ONE_READ)
def test_nonfinite_in_chosen_tiles_and_the_tail(strategy):
    nan, inf = float("nan"), float("inf")
    # 9 full tiles and a tail of 7: program 2 holds tile 2 and 6, program 3 tile 7, program 1 the tail (9)
    x = tiles({2: [nan, 1.0, nan], 6: [inf], 7: [-inf, -2.0]}, n_tiles=9, tail=7)
    x[-3:] = torch.tensor([nan, inf, -inf])
    y = torch.full((TILE + 9,), nan)  # nothing finite: the grid stays
    y[TILE + 1] = 0.75
    state = check_sequence([x, y, x.flip(0)], 256, torch.float32, strategy)
    assert state.seen.tolist() == [2 * (x.numel() - 7) + 1, 2 * 7 + y.numel() - 1, 3, 0]


@pytest.mark.parametrize("strategy", ["smem_rows", "tl_histogram", "atomic"])
def test_bin_edges_and_tiny_negatives(strategy):
    edges = torch.arange(-64, 65, dtype=torch.float32) / 16  # on edges of width 1/16
    below = torch.nextafter(edges, torch.tensor(-math.inf))
    tiny = torch.tensor([-1e-45, -1e-40, -1e-38, -0.0, 0.0, 1e-45, -(2.0**-126)])
    coarse = torch.tensor([-5e5, 5e5, -1e-45, -1e-30, 3e-39])  # e > 0: tiny negatives underflow to -0.0
    check_sequence([edges, below, tiny, torch.cat([edges, tiny]), coarse, edges], 64, torch.float32, strategy)


@pytest.mark.parametrize(
    "strategy,scale",
    [("smem_rows", 1.0), ("smem_rows", -1.0), ("smem_rows", 2.0**100), ("tl_histogram", 2.0**-110)],
)
def test_scaled_values_near_2_24(strategy, scale):
    """A narrow range at large magnitude: the float32-spacing floor sets the grid, so ``|x * 2**-e|`` and
    the origin are near ``2**24`` and the bin is a difference of two such integers."""
    top = 2.0**24
    x = (top - torch.randint(1, 4000, (TILE + 5,)).float()) * scale
    x[:3] = torch.tensor([top - 1, top - 4000, top - 2]) * scale
    grow = (top - torch.randint(1, 2000, (500,)).float()) * scale * 0.5  # growing by a factor 2
    check_sequence([x, x[::7], grow, x], 2048, torch.float32, strategy)


@pytest.mark.parametrize("strategy", ["smem_rows", "atomic"])
def test_concentrated(strategy):
    x = (torch.randn(6 * TILE) * 0.3).round() * 0.25  # three bins hold almost everything
    x[:: TILE // 2] = torch.randn(12) * 40  # outliers in several tiles: the range grows past the grid
    check_sequence([x, x.roll(TILE // 3), x * 0.5], 2048, torch.bfloat16, strategy)


@pytest.mark.parametrize("strategy", ["smem_rows", "smem_atomic", "tl_histogram"])
def test_side_buffer_overflow(strategy, monkeypatch):
    """Program 0 meets values off the grid in tiles 0, 4 and 8 (past ``SIDE``: it re-reads its tiles),
    program 1 in tile 1 and program 3 in the tail (noted: only those tiles are read again)."""
    monkeypatch.setattr(khist, "SIDE", 2)
    start = torch.rand(11 * TILE + 9)
    grow = tiles({0: [5.0, -3.0], 4: [7.5], 8: [-9.0, 11.0], 1: [6.0]}, n_tiles=11, tail=9)
    grow[-1] = -12.0  # the tail (tile 11) belongs to program 3
    check_sequence([start, grow, -grow, grow * 40], 64, torch.float32, strategy)


def test_smem_fits_up_to_the_shared_memory_cap(monkeypatch):
    """``"smem_rows"`` counts in its kernels up to ``PTX_MAX_SLOTS`` counters, past it with ``"histc"``."""
    calls = []
    histc = khist._histc_counts_
    monkeypatch.setattr(khist, "_histc_counts_", lambda *a: calls.append(1) or histc(*a))
    fits = (_smem.PTX_MAX_SLOTS - 3) // 2 - 1  # the largest user bins whose counters fit: 6141
    assert khist.counter_slots(internal_bins(fits)) <= _smem.PTX_MAX_SLOTS
    assert khist.counter_slots(internal_bins(fits + 1)) > _smem.PTX_MAX_SLOTS
    x = torch.randn(TILE + 1) * 100
    check_sequence([x, x * 3], fits, torch.float32, "smem_rows")
    assert not calls
    check_sequence([x, x * 3], fits + 1, torch.float32, "smem_rows")
    assert len(calls) == 2


@pytest.mark.parametrize("strategy", ["histc", "atomic"])  # "smem_rows" runs as "histc" at this size
def test_max_bins_exact(strategy):
    """Issue 12 item 5: the largest ``bins`` an observer takes (``MAX_BINS``, ``2**21 + 2`` internal bins),
    with values at the grid's extremes: ``[-(2**k - 1), 2**k - 2, 2**k - 4, 1]`` for the largest ``k``
    that keeps unit bins (``k = 20``): bin numbers up to ``2**21 - 3``, each value alone in its bin."""
    k = 20
    first = torch.tensor([-(2.0**k - 1), 2.0**k - 2, 2.0**k - 4, 1.0])
    near_top = 2.0**k - 2 - torch.arange(0, 2000, 3, dtype=torch.float32)  # the top bins, exactly
    state = check_sequence([first, near_top], MAX_BINS, torch.float32, strategy)
    assert (int(state.exponent), int(state.origin)) == (0, -(2**k - 1))
    top = 2**k - 2 + 2**k - 1
    assert [int(state.counts[j]) for j in (0, 2**k, top - 2, top)] == [1, 1, 1, 2]


@pytest.mark.parametrize("strategy", ["smem_rows", "histc"])
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
    assert got.seen.tolist() == [3 + 4 + 2 + 2, 4 + 1, 5, 0]


@pytest.mark.parametrize("strategy", ["smem_rows", "atomic", "histc"])
def test_float64_beyond_float32_and_tiny_negatives(strategy):
    # float64 is observed as its float32 values: 1e300 becomes inf (non-finite), -1e-50 becomes -0.0
    seq = [
        torch.tensor([1e300, -1e-50, 1000.0, 5.0, -1e300], dtype=torch.float64),
        torch.randn(3000, dtype=torch.float64) * 1e3,
        torch.tensor([-1e-50, float("nan"), 2.5], dtype=torch.float64),
    ]
    state = check_sequence(seq, 8, torch.float64, strategy)
    assert state.seen.tolist() == [3 + 3000 + 2, 2 + 1, 3, 0]
    assert int(state.counts.sum()) == int(state.seen[0])


@pytest.mark.parametrize("strategy", ["smem_rows", "histc"])
def test_steady_state_keeps_grid(strategy):
    got = fresh(128)
    khist.histogram_update_(torch.linspace(-4, 4, 1001), got, strategy=strategy)
    grid = (got.exponent.clone(), got.origin.clone())
    khist.histogram_update_(torch.linspace(-3, 3, 999), got, strategy=strategy)
    assert torch.equal(got.exponent, grid[0]) and torch.equal(got.origin, grid[1])
    assert int(got.counts.sum()) == 2000


@pytest.mark.parametrize("strategy", ["histc", "smem_rows"])
@pytest.mark.parametrize("method", ["kl", "percentile"])
def test_observer_triton_equal_torch(method, strategy, monkeypatch):
    monkeypatch.setattr(khist, "HIST_STRATEGY", strategy)
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


def test_strategy_from_environment(monkeypatch):
    monkeypatch.delenv("MONO_QUANT_HIST_STRATEGY", raising=False)
    assert khist._default_strategy() == "histc"
    monkeypatch.setenv("MONO_QUANT_HIST_STRATEGY", " SMEM_ROWS ")
    assert khist._default_strategy() == "smem_rows"
    monkeypatch.setenv("MONO_QUANT_HIST_STRATEGY", "warp_atomic")
    with pytest.raises(
        ValueError, match="'warp_atomic' is not one of histc, atomic, tl_histogram, smem_rows"
    ):
        khist._default_strategy()
    with pytest.raises(ValueError, match="strategy='mma' is not one of"):
        khist.histogram_update_(torch.randn(10), fresh(16), strategy="mma")


def test_counters_by_triton_version(monkeypatch):
    monkeypatch.delenv("MONO_QUANT_SMEM_COUNTERS", raising=False)
    for version, counters in (
        ("3.6.0", "ptx"),
        ("3.7.1", "ptx"),
        ("3.9.1", "ptx"),
        ("3.10.0", "tl_histogram"),
    ):
        monkeypatch.setattr(_smem.triton, "__version__", version)
        assert _smem._counters_on_gpu() == counters
    monkeypatch.setenv("MONO_QUANT_SMEM_COUNTERS", "ptx")
    assert _smem._counters_on_gpu() == "ptx"
    monkeypatch.setenv("MONO_QUANT_SMEM_COUNTERS", "gluon")
    with pytest.raises(ValueError, match="'gluon' is not one of ptx, tl_histogram"):
        _smem._counters_on_gpu()


def test_histc_binning_in_chunks(monkeypatch):
    """The ``"histc"`` binning counts ``HISTC_CHUNK`` values per ``torch.histc`` call (its float32 counts
    stay exact): with small chunks, batches of several chunks and a ragged last one count every value."""
    monkeypatch.setattr(khist, "HISTC_CHUNK", 1000)
    x = torch.randn(4097) * 5
    x[999:1001] = float("nan")  # across a chunk boundary
    state = check_sequence([x, torch.rand(2500) * 40 - 20, x[:1000]], 2048, torch.bfloat16, "histc")
    assert int(state.counts.sum()) == 4095 + 2500 + 999


def test_deterministic_mode(monkeypatch):
    """torch.histc on CUDA refuses deterministic mode: "histc" then bins with integer atomics; the
    one-read binnings (integer counters, exact in any order) run as they are."""
    used = []
    monkeypatch.setattr(khist, "_histc_counts_", lambda *a: used.append("histc"))
    binned = khist._binned_update_
    monkeypatch.setattr(
        khist, "_binned_update_", lambda x, s, c, keep, rows: used.append(c) or binned(x, s, c, keep, rows)
    )
    torch.use_deterministic_algorithms(True)
    try:
        check_sequence(growing(300)[:3], 64, torch.float32, "histc")
        check_sequence(growing(300)[:3], 64, torch.float32, "smem_rows")
    finally:
        torch.use_deterministic_algorithms(False)
    assert used == ["global"] * 3 + ["scratch"] * 3
