"""The canonical-grid histogram: exact binning, order-free merging, bounded memory, resolution."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mono_quant import HistogramObserver
from mono_quant import grid as G
from mono_quant.core import search as S
from mono_quant.state import merge_histograms


def _oracle_counts(values: torch.Tensor, exponent: int, origin: int, num_bins: int) -> torch.Tensor:
    """Bin finite values in float64, where x / 2**e is exact: independent of the float32 code path."""
    v = values[torch.isfinite(values)].to(torch.float64)
    idx = torch.floor(v / 2.0**exponent).to(torch.int64) - origin
    assert int(idx.min()) >= 0 and int(idx.max()) < num_bins
    return torch.bincount(idx, minlength=num_bins)


def _observe(batches, bins=64):
    obs = HistogramObserver(bins=bins, backend="torch")
    for b in batches:
        obs(b)
    return obs


def _state(obs):
    return (int(obs.exponent), int(obs.origin), obs.counts.clone(), float(obs.min_val), float(obs.max_val))


def _assert_same(a, b):
    assert a[:2] == b[:2]
    assert torch.equal(a[2], b[2])
    assert a[3:] == b[3:]


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(10_000),
        torch.randn(10_000) * 1e-20,
        torch.rand(5_000) * 1e30,
        -torch.rand(5_000) - 3.0,
        torch.tensor([0.0]),
        torch.tensor([7.0, 7.0, 7.0]),
        torch.cat([torch.randn(1000), torch.tensor([3e38, -3e38])]),
        torch.cat([torch.tensor([-1e-38, -1e-42, 1e-42]), torch.tensor([1e38])]),  # underflow when binned
    ],
    ids=["normal", "tiny", "huge", "negative", "zero", "constant", "float32-limit", "underflow"],
)
def test_counts_equal_exact_binning(values):
    obs = _observe([values])
    e, o = int(obs.exponent), int(obs.origin)
    assert G.E_MIN <= e <= G.E_MAX
    assert torch.equal(obs.counts, _oracle_counts(values, e, o, obs.counts.shape[0]))
    assert int(obs.counts.sum()) == values.numel()
    assert obs.counts.dtype == torch.int64


@pytest.mark.parametrize("bins", [1, 2, 3, 64, 2048])
def test_grid_is_the_finest_that_fits_and_resolution_holds(bins):
    values = torch.randn(5000) * 3 + 1
    obs = _observe([values], bins=bins)
    e, o, nb = int(obs.exponent), int(obs.origin), obs.counts.shape[0]
    mn, mx = float(values.min()), float(values.max())
    w = 2.0**e
    assert nb == G.internal_bins(bins)
    assert o == math.floor(mn / w)
    assert math.floor(mx / w) - o < nb  # everything fits
    assert math.floor(mx / (w / 2)) - math.floor(mn / (w / 2)) >= nb  # one step finer would not
    assert w <= (mx - mn) / bins  # the resolution guarantee
    edges = obs.bin_edges
    assert len(edges) == len(obs.histogram_counts) + 1
    assert float(edges[0]) <= mn and float(edges[-1]) > mx


def test_float32_spacing_floor():
    # 1 + k ulp: a finer width than the float32 spacing could not hold distinct values
    values = torch.tensor([1.0, 1.0 + 2**-23, 1.0 + 2**-22])
    obs = _observe([values])
    assert int(obs.exponent) == -23
    assert obs.counts[obs.counts > 0].tolist() == [1, 1, 1]


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.one_of(
            st.floats(-1e6, 1e6, width=32),
            st.floats(width=32, allow_nan=True, allow_infinity=True),
        ),
        min_size=1,
        max_size=300,
    ),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    seed=st.integers(0, 2**16),
    bins=st.sampled_from([1, 5, 64]),
)
def test_any_batching_and_order_gives_the_same_histogram(data, cuts, seed, bins):
    values = torch.tensor(data, dtype=torch.float32)
    one = _observe([values], bins)
    g = torch.Generator().manual_seed(seed)
    shuffled = values[torch.randperm(values.numel(), generator=g)]
    bounds = sorted({0, values.numel(), *[c % (values.numel() + 1) for c in cuts]})
    batches = [shuffled[a:b] for a, b in zip(bounds, bounds[1:])]
    many = _observe(batches, bins)
    assert int(one.seen[0]) == int(many.seen[0]) == int(torch.isfinite(values).sum())
    assert int(one.seen[1]) == int(many.seen[1])
    if int(one.seen[0]) == 0:
        assert one.histogram_counts is None and many.histogram_counts is None
        return
    _assert_same(_state(one), _state(many))
    e, o = int(one.exponent), int(one.origin)
    assert torch.equal(one.counts, _oracle_counts(values, e, o, one.counts.shape[0]))


@settings(max_examples=30, deadline=None)
@given(
    parts=st.lists(st.lists(st.floats(-1e4, 1e4, width=32), min_size=0, max_size=50), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_merge_is_exact_associative_and_commutative(parts, seed):
    tensors = [torch.tensor(p, dtype=torch.float32) for p in parts]
    observers = [_observe([t]) for t in tensors]
    states = [o.state() for o in observers]
    everything = torch.cat(tensors)
    order = torch.randperm(len(states), generator=torch.Generator().manual_seed(seed)).tolist()
    merged = states[order[0]]
    for i in order[1:]:
        merged = merge_histograms(merged, states[i])
    if everything.numel() == 0:
        assert int(merged.counts.sum()) == 0
        return
    one = _observe([everything])
    assert int(merged.exponent) == int(one.exponent)
    assert int(merged.origin) == int(one.origin)
    assert torch.equal(merged.counts, one.counts)


def test_merge_rejects_different_bin_counts():
    a = _observe([torch.randn(10)], bins=8).state()
    b = _observe([torch.randn(10)], bins=16).state()
    with pytest.raises(ValueError, match="same `bins`"):
        merge_histograms(a, b)


def test_regrid_moves_counts_exactly():
    values = torch.randn(1000)
    obs = _observe([values], bins=32)
    e, o = obs.exponent.clone(), obs.origin.clone()
    new_e, new_o = G.canonical_grid(torch.tensor(-100.0), torch.tensor(100.0), obs.counts.shape[0])
    moved = G.regrid(obs.counts, e, o, new_e, new_o)
    assert torch.equal(moved, _oracle_counts(values, int(new_e), int(new_o), obs.counts.shape[0]))


def test_grids_and_regrids_of_many_histograms_at_once_are_each_ones():
    """Segmented states hold one grid per segment: ``canonical_grid`` and ``regrid`` work elementwise."""
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([1e-30, 1.0, 10.0, 1e3, 0.0, 1e30, 3.0, 1.0])
    lo = torch.randn(8, generator=g) * scale
    hi = lo + torch.rand(8, generator=g) * scale
    lo[6], hi[6] = float("inf"), float("-inf")  # nothing seen
    e, o = G.canonical_grid(lo, hi, 40)
    new_e, new_o = G.canonical_grid(lo - lo.abs() * 3 - 1, hi + hi.abs() * 3 + 1, 40)
    counts = torch.randint(0, 5, (8, 40), generator=g)
    moved = G.regrid(counts, e, o, new_e, new_o)
    assert not torch.equal(moved, counts)
    for i in range(8):
        one = G.canonical_grid(lo[i], hi[i], 40)
        assert one[0].shape == () and (int(one[0]), int(one[1])) == (int(e[i]), int(o[i]))
        assert torch.equal(moved[i], G.regrid(counts[i], e[i], o[i], new_e[i], new_o[i]))
    assert torch.equal(moved.sum(1), counts.sum(1))


def test_counts_do_not_saturate_at_2_pow_24():
    n = 2**24 + 3  # a float32 count stops at 2**24
    obs = _observe([torch.zeros(n)])
    assert int(obs.counts.max()) == n


def test_growing_range_keeps_memory_bounded():
    obs = HistogramObserver(bins=16, backend="torch")
    for k in range(-30, 30, 3):
        obs(torch.randn(100) * 10.0**k)
    assert obs.counts.shape[0] == G.internal_bins(16)
    assert int(obs.counts.sum()) == 100 * 20


def test_abs_histogram_is_a_fold_of_the_signed_one():
    values = torch.randn(4000)
    obs = _observe([values], bins=64)
    folded = G.abs_histogram(obs.counts, obs.origin)
    w = 2.0 ** int(obs.exponent)
    # values on a negative edge land one |x| bin lower; randn has none
    want = torch.bincount(torch.floor(values.abs().double() / w).long(), minlength=folded.shape[0])
    assert torch.equal(folded, want)


# ---------------------------------------------------------------------------------------------------
# threshold search against a slow, obviously-correct loop


def _kl_loop(hist, lo, hi, nq):
    """One candidate at a time, as ModelOpt writes it: build P and Q, then sum p log(p / q)."""
    h = hist.to(torch.float64)
    out = []
    for a, b in zip(lo.tolist(), hi.tolist()):
        window = h[a:b].clone()
        p = window.clone()
        p[0] += h[:a].sum()
        p[-1] += h[b:].sum()
        n = b - a
        q = torch.zeros(n, dtype=torch.float64)
        chunk = [j * nq // n for j in range(n)]
        for c in set(chunk):
            members = [j for j in range(n) if chunk[j] == c and window[j] > 0]
            if members:
                total = sum(float(window[j]) for j in members)
                for j in members:
                    q[j] = total / len(members)
        p = p / p.sum()
        q = q / q.sum()
        kl = 0.0
        for pj, qj in zip(p.tolist(), q.tolist()):
            if pj > 0:
                kl = math.inf if qj == 0 else kl + pj * math.log(pj / qj)
        out.append(kl)
    return torch.tensor(out, dtype=torch.float64)


def _random_hist(n, seed, zeros=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, 1000, (n,), generator=g)
    h[torch.rand(n, generator=g) < zeros] = 0
    h[0] = max(int(h[0]), 1)
    return h


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("nq", [4, 16, 128])
def test_kl_divergences_match_the_loop(seed, nq):
    hist = _random_hist(300, seed)
    g = torch.Generator().manual_seed(seed + 100)
    lo = torch.randint(0, 150, (40,), generator=g)
    hi = lo + torch.randint(1, 150, (40,), generator=g)
    fast = S.kl_divergences(hist, lo, hi, nq)
    slow = _kl_loop(hist, lo, hi, nq)
    assert torch.equal(torch.isinf(fast), torch.isinf(slow))
    finite = torch.isfinite(slow)
    assert torch.allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-9)


def _mse_loop(hist, width, first, lo, hi, step):
    h = hist.to(torch.float64)
    out = []
    for a, b, s in zip(lo.tolist(), hi.tolist(), step.tolist()):
        left, right = (first + a) * width, (first + b) * width
        err = 0.0
        for j, count in enumerate(h.tolist()):
            c = (first + j + 0.5) * width
            if a <= j < b:
                err += count * (c - s * round(c / s)) ** 2
            elif j < a:
                err += count * (c - left) ** 2
            else:
                err += count * (c - right) ** 2
        out.append(err)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_mse_errors_match_the_loop(seed):
    hist = _random_hist(200, seed)
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 100, (30,), generator=g)
    hi = lo + torch.randint(1, 100, (30,), generator=g)
    step = torch.rand(30, generator=g, dtype=torch.float64)
    fast = S.mse_errors(hist, 0.25, -37, lo, hi, step)
    slow = _mse_loop(hist, 0.25, -37, lo, hi, step)
    assert torch.allclose(fast, slow, rtol=1e-9)


def test_symmetric_kl_picks_the_loop_minimum():
    values = torch.distributions.StudentT(3.0).sample((50_000,))
    obs = HistogramObserver(bins=512, method="kl", qscheme="symmetric", backend="torch")
    obs(values)
    hist = G.abs_histogram(obs.counts, obs.origin)
    hist = hist[: int(torch.nonzero(hist).max()) + 1]
    hist = torch.cat([hist[1:2], hist[1:]])  # ModelOpt's zero-bin rule
    hi = S.symmetric_candidates(hist.shape[0], "cpu")
    slow = _kl_loop(hist, torch.zeros_like(hi), hi, 128)
    best = hi[len(slow) - 1 - int(torch.argmin(slow.flip(0)))]
    lo_t, hi_t = obs._range()
    w = 2.0 ** int(obs.exponent)
    assert abs(float(hi_t) - min(int(best) * w, float(obs.max_val.abs().max()))) <= w
    assert float(lo_t) == max(-float(hi_t), float(obs.min_val)) or float(lo_t) == -int(best) * w


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_percentile_is_within_a_bin_of_the_exact_quantile(qscheme):
    values = torch.randn(100_000) * 2 + 0.5
    obs = HistogramObserver(bins=1024, method="percentile", percentile=99.0, qscheme=qscheme, backend="torch")
    obs(values)
    lo, hi = obs._range()
    w = 2.0 ** int(obs.exponent)
    if qscheme == "symmetric":
        want = torch.quantile(values.abs().double(), 0.99)
        assert abs(float(hi) - float(want)) <= w
    else:
        want_lo, want_hi = torch.quantile(values.double(), torch.tensor([0.01, 0.99], dtype=torch.float64))
        assert abs(float(lo) - float(want_lo)) <= w and abs(float(hi) - float(want_hi)) <= w


@pytest.mark.parametrize("method", ["kl", "mse", "percentile"])
@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_search_clips_heavy_tails_and_stays_inside_the_data(method, qscheme):
    values = torch.distributions.StudentT(3.0).sample((200_000,))
    obs = HistogramObserver(bins=2048, method=method, qscheme=qscheme, backend="torch")
    obs(values)
    lo, hi = obs._range()
    mn, mx = float(values.min()), float(values.max())
    assert mn <= float(lo) <= 0.0 <= float(hi) <= mx
    assert float(hi) < 0.9 * mx and float(lo) > 0.9 * mn  # the tails are clipped
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale) and float(scale) > 0


def test_kl_keeps_isolated_outliers_as_modelopt_does():
    # an empty last bin that must take the outliers scores inf (ModelOpt's rule), so a gap between
    # the bulk and two far outliers leaves only candidates that reach them
    values = torch.cat([torch.randn(100_000), torch.tensor([80.0, -60.0])])
    obs = HistogramObserver(bins=2048, method="kl", qscheme="symmetric", backend="torch")
    obs(values)
    assert float(obs._range()[1]) >= 60.0


def test_coarse_to_fine_finds_the_minimum_of_a_unimodal_curve():
    for count in [1, 5, 256, 257, 1000, 4097]:
        for true_best in {0, count // 3, count - 1}:
            curve = (torch.arange(count, dtype=torch.float64) - true_best).abs() + 0.5
            scored = []

            def score(i, curve=curve, scored=scored):
                scored.append(len(i))
                return curve[i]

            assert S.coarse_to_fine_argmin(score, count) == true_best
            assert sum(scored) <= 3 * S.COARSE_CANDIDATES + 2


@pytest.mark.parametrize("qscheme", ["affine", "symmetric"])
def test_mse_search_picks_the_best_scored_candidate(qscheme):
    values = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    obs = HistogramObserver(bins=1024, method="mse", qscheme=qscheme, dtype=torch.int4, backend="torch")
    obs(values)
    lo, hi = obs._range()
    scale, zp = obs.calculate_qparams()
    qmin, qmax = -8, 7
    from mono_quant import fake_quantize

    def err(s, z):
        return float((fake_quantize(values, s, z, qmin, qmax) - values).square().sum())

    chosen = err(scale, zp)
    # no range of the family scaled from the observed one does much better on the data itself
    mn, mx = float(values.min()), float(values.max())
    from mono_quant.core.qparams import QuantSpec, calculate_qparams

    spec = QuantSpec(torch.int4, qscheme)
    best = min(
        err(*calculate_qparams(torch.tensor(mn * t), torch.tensor(mx * t), spec))
        for t in torch.linspace(0.05, 1, 96).tolist()
    )
    assert chosen <= best * 1.05


# --- bounds: bins and memory ------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [G.MAX_BINS + 1, 2**24, 2**30])
def test_bins_past_the_exact_float32_bin_numbers_are_refused(bins):
    with pytest.raises(ValueError, match=f"bins={bins} must be an int from 1 to {G.MAX_BINS}"):
        HistogramObserver(bins=bins)


def test_the_largest_bins_bin_every_value_exactly():
    # the example scaled to the largest allowed histogram: the extremes of the range, values two
    # and four bins from the top, and a value near zero (bin numbers up to internal_bins(MAX_BINS) - 1)
    k = (G.internal_bins(G.MAX_BINS) - 2).bit_length() - 2  # [-(2**k - 1), 2**k - 1] fits in unit bins
    values = torch.tensor([-(2.0**k - 1), 2.0**k - 2, 2.0**k - 4, 1.0, 0.5, -0.5])
    obs = _observe([values], bins=G.MAX_BINS)
    e, o = int(obs.exponent), int(obs.origin)
    assert e == 0  # unit bins: every integer value in its own bin
    assert torch.equal(obs.counts, _oracle_counts(values, e, o, obs.counts.shape[0]))


def test_symmetric_kl_search_memory_is_bounded():
    from mono_quant.timing import peak_extra_bytes

    hist = torch.randint(0, 50, (200_000,))
    hi = S.symmetric_candidates(hist.shape[0], "cpu")
    lo = torch.zeros_like(hi)
    peak = peak_extra_bytes(lambda: S.kl_divergences(hist, lo, hi, 128), "cpu")
    # all 2e5 candidates at once held (K, 129, 2) float64 gathers: about 1 GB; in groups, a few dozen MB
    assert peak < 128 * 2**20, peak
    first, last = S.kl_divergences(hist, lo[:5], hi[:5], 128), S.kl_divergences(hist, lo[-5:], hi[-5:], 128)
    whole = S.kl_divergences(hist, lo, hi, 128)
    assert torch.equal(whole[:5], first) and torch.equal(whole[-5:], last)  # the groups change no score
