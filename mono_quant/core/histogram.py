"""The canonical-grid histogram: exact, mergeable, bounded; and the threshold searches on it.

Grid. Bin width is a power of two ``w = 2**e`` and edges sit at integer multiples of ``w``: with
state ``(e, origin, counts[B])``, bin ``j`` covers ``[(origin + j) * w, (origin + j + 1) * w)``. A value's
bin is ``floor(x * 2**-e) - origin``; multiplying by a power of two is exact, so every backend bins every
value identically. The grid is a function of the finite min and max seen, never of the order:

- ``e`` is the smallest integer in ``[-126, 126]`` with ``floor(max / w) - floor(min / w) < B``, but never
  below ``floor(log2(max|x|)) - 23`` (the float32 spacing at the largest magnitude: finer bins cannot hold
  distinct values, and it keeps ``|x| * 2**-e < 2**24``, exact in float32 and int32);
- ``origin = floor(min / w)``.

Both rules are monotone in the range, so growing the range only coarsens: old bin ``j`` moves to
``((origin + j) >> k) - origin'`` for ``k = e' - e`` (integer arithmetic, exact). Merging two states
coarsens both onto the grid of their combined range and adds counts, so merging is associative and
commutative, and any batching, order or rank split ends on the same grid with the same counts.

``B = internal_bins(bins) = max(2 * bins + 2, 8)``: a power-of-two width wastes up to half the range, so
twice the user's bins (plus two for the partial bins at the ends) guarantee a width no coarser than
``(max - min) / bins``, except where the float32-spacing floor above says no finer bins can exist.

Threshold search (all candidates at once, on the histogram's device, float64):

- ``kl``: TensorRT / ModelOpt entropy calibration. Symmetric: on the |x| histogram (an exact fold, since
  zero is an edge), every candidate of ``i >= 128`` bins (all bins if fewer) is scored by
  ``KL(P || Q)``, where ``P`` is ``hist[:i]`` with the outliers added to its last bin and ``Q`` is
  ``hist[:i]`` merged into ``nq`` chunks (bin ``b`` in chunk ``floor(b * nq / i)``) and spread evenly over
  the chunk's non-empty bins; ``nq`` is the number of quantized levels on one side (128 for int8). As in
  ModelOpt, bin 0 takes bin 1's count first (a spike of exact zeros would dominate otherwise) and the last
  of the minima wins. Affine: the same score on the signed histogram with outliers
  folded into both end bins and ``nq = qmax - qmin + 1`` chunks, over the *scaled-range* family
  ``[min, max] * t`` (zero point kept), rounded out to bin edges.
- ``mse``: squared error of quantizing the histogram's bin centres with the candidate range: the
  rounding error for each value inside, ``(x - edge)**2`` for each value clipped. Same candidate
  families as ``kl``.
- Symmetric ``kl`` scores every candidate (it must match ModelOpt). ``mse`` and affine ``kl`` cost
  more per candidate and have smooth curves: they score every ``stride``-th candidate (at most 256),
  then every candidate around the best of those (``coarse_to_fine_argmin``).
- ``percentile``: the value below which ``percentile`` % of |x| (symmetric) lies, or the
  ``(100 - p, p)`` percentiles of x (affine), interpolated linearly inside a bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "E_MAX",
    "E_MIN",
    "HistogramState",
    "abs_histogram",
    "bin_edges",
    "bin_index",
    "canonical_grid",
    "internal_bins",
    "kl_divergences",
    "merge_histograms",
    "mse_errors",
    "percentile_position",
    "regrid",
    "search_range",
]

E_MIN, E_MAX = -126, 126  # 2**-e stays a normal float32 for every e in range
# Candidates scored in the first round of the coarse-to-fine searches (mse; affine kl).
COARSE_CANDIDATES = 256


def internal_bins(bins: int) -> int:
    """Number of bins held for a user ``bins`` (see the module docstring)."""
    return max(2 * bins + 2, 8)


def floor_scaled(x: torch.Tensor, inv_w: torch.Tensor) -> torch.Tensor:
    """``floor(x * inv_w)`` for float32 ``x`` and a power of two ``inv_w``, as float32.

    The product is exact except where it underflows; a tiny negative value can then round to -0.0,
    whose floor is 0 instead of -1, so negatives are pinned to at most -1.
    """
    q = torch.floor(x * inv_w)
    return torch.where(x < 0, torch.clamp(q, max=-1.0), q)


def bin_index(x: torch.Tensor, exponent: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Bin of each float32 value on grid ``(exponent, origin)``, as int64 (no range check)."""
    inv_w = torch.ldexp(torch.ones((), dtype=torch.float32, device=x.device), -exponent).to(torch.float32)
    return floor_scaled(x, inv_w).to(torch.int64) - origin


def canonical_grid(
    min_val: torch.Tensor, max_val: torch.Tensor, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid ``(exponent, origin)`` (0-d int64) of data whose finite range is ``[min_val, max_val]``.

    Pure tensor ops, no host read: usable inside a CUDA graph. For an empty range (``min > max``, nothing
    finite seen) returns the finest grid ``(E_MIN, 0)``, which any later range coarsens from.
    """
    device = min_val.device
    mn = min_val.to(torch.float32)
    mx = max_val.to(torch.float32)
    exps = torch.arange(E_MIN, E_MAX + 1, device=device, dtype=torch.int64)
    inv_w = torch.ldexp(torch.ones_like(exps, dtype=torch.float32), -exps).to(torch.float32)
    span = floor_scaled(mx, inv_w) - floor_scaled(mn, inv_w)
    _, mag_exp = torch.frexp(torch.maximum(mn.abs(), mx.abs()))
    e_floor = (mag_exp.to(torch.int64) - 1 - 23).clamp(E_MIN, E_MAX)
    ok = (span < num_bins) & (exps >= e_floor)
    # exps is increasing and `ok` is monotone in it: the first True is the smallest valid e.
    exponent = torch.where(ok, exps, E_MAX).amin()
    empty = ~(mn <= mx)
    exponent = torch.where(empty, E_MIN, exponent)
    inv = torch.ldexp(torch.ones((), dtype=torch.float32, device=device), -exponent).to(torch.float32)
    origin = torch.where(empty, 0, floor_scaled(mn, inv).to(torch.int64))
    return exponent, origin


def regrid(
    counts: torch.Tensor,
    exponent: torch.Tensor,
    origin: torch.Tensor,
    new_exponent: torch.Tensor,
    new_origin: torch.Tensor,
) -> torch.Tensor:
    """Counts on grid ``(exponent, origin)`` moved to a coarser or equal grid ``(new_exponent, new_origin)``.

    Exact (integer shifts). The new grid must cover the old data, which ``canonical_grid`` of a containing
    range guarantees; indices are clamped only so that empty bins of an empty state stay in range.
    """
    num_bins = counts.shape[0]
    shift = (new_exponent - exponent).clamp(0, 62)
    j = torch.arange(num_bins, device=counts.device, dtype=torch.int64)
    dest = torch.bitwise_right_shift(origin + j, shift) - new_origin
    dest = dest.clamp(0, num_bins - 1)
    return torch.zeros_like(counts).index_add_(0, dest, counts)


def bin_edges(exponent: torch.Tensor, origin: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The ``num_bins + 1`` edges of a grid, float64 (exact: integers times a power of two)."""
    j = torch.arange(num_bins + 1, device=origin.device, dtype=torch.float64)
    return torch.ldexp(origin.to(torch.float64) + j, exponent)


@dataclass
class HistogramState:
    """One histogram: the grid, int64 counts, the finite range and how many values it holds.

    ``min_val``/``max_val`` are 0-d float32 (``+inf``/``-inf`` when nothing finite was seen); ``exponent``
    and ``origin`` 0-d int64; ``counts`` int64 ``(B,)``; ``nonfinite`` 0-d int64.
    """

    exponent: torch.Tensor
    origin: torch.Tensor
    counts: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    nonfinite: torch.Tensor


def merge_histograms(a: HistogramState, b: HistogramState) -> HistogramState:
    """The state one histogram would hold after seeing the data of both (exact, order-free).

    Raises:
        ValueError: if the two hold a different number of bins.
    """
    if a.counts.shape != b.counts.shape:
        raise ValueError(
            f"cannot merge histograms of {a.counts.shape[0]} and {b.counts.shape[0]} internal bins; "
            "observers must be created with the same `bins`"
        )
    num_bins = a.counts.shape[0]
    mn = torch.minimum(a.min_val, b.min_val)
    mx = torch.maximum(a.max_val, b.max_val)
    e, o = canonical_grid(mn, mx, num_bins)
    counts = regrid(a.counts, a.exponent, a.origin, e, o) + regrid(b.counts, b.exponent, b.origin, e, o)
    return HistogramState(e, o, counts, mn, mx, a.nonfinite + b.nonfinite)


def abs_histogram(counts: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Fold a signed histogram into one of |x| on the same width: bin ``k >= 0`` holds ``[k w, (k+1) w)``.

    Zero is always an edge, so signed bin ``g < 0`` (``[g w, (g+1) w)``) folds onto |x| bin ``-g - 1``.
    Returns int64 counts of length ``max(|origin|, origin + B)`` (the farthest edge from zero).
    """
    num_bins = counts.shape[0]
    g = origin + torch.arange(num_bins, device=counts.device, dtype=torch.int64)
    k = torch.where(g >= 0, g, -g - 1)
    length = int(torch.maximum(origin.abs(), origin + num_bins))
    return torch.zeros(length, dtype=counts.dtype, device=counts.device).index_add_(0, k, counts)


# ----------------------------------------------------------------------------------------------------
# Threshold search. Candidates are windows [L, R) of bins of one histogram; each objective is computed
# for all of them at once from prefix sums, so the cost is O(candidates * chunks), not O(candidates * bins).


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t * torch.log(torch.where(t > 0, t, 1)), 0)


def kl_divergences(hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, nq: int) -> torch.Tensor:
    """``KL(P || Q)`` of each candidate window ``[lo[k], hi[k])`` of bins (see the module docstring).

    Args:
        hist: ``(N,)`` counts.
        lo, hi: ``(K,)`` int64 bin indices, ``0 <= lo < hi <= N``.
        nq: number of quantized chunks.

    Returns:
        ``(K,)`` float64 divergences; ``inf`` where an end bin is empty but receives outliers.
    """
    h = hist.to(torch.float64)
    zero = h.new_zeros(1)
    csum = torch.cat([zero, h.cumsum(0)])  # csum[j] = sum(h[:j])
    cnz = torch.cat([zero, (h > 0).to(torch.float64).cumsum(0)])
    chl = torch.cat([zero, _xlogx(h).cumsum(0)])
    total = csum[-1]
    n = hi - lo
    last = hi - 1
    out_lo, out_hi = csum[lo], total - csum[hi]
    h_lo, h_last = h[lo], h[last]
    single = n == 1

    # P: the window with outliers folded into its end bins.
    p_lo = h_lo + out_lo + torch.where(single, out_hi, 0)
    p_last = h_last + out_hi
    sum_p_logp = (
        chl[hi]
        - chl[lo]
        - _xlogx(h_lo)
        + _xlogx(p_lo)
        + torch.where(single, 0, _xlogx(p_last) - _xlogx(h_last))
    )

    # Q: chunk c holds bins [lo + ceil(c n / nq), lo + ceil((c+1) n / nq)); one gather gives both the
    # counts and the non-empty bins at every chunk edge.
    c = torch.arange(nq + 1, device=h.device, dtype=torch.int64)
    edges = lo[:, None] + (c[None, :] * n[:, None] + nq - 1) // nq  # (K, nq + 1)
    at_edges = torch.stack([csum, cnz], dim=1)[edges]  # (K, nq + 1, 2)
    chunk = at_edges[:, 1:] - at_edges[:, :-1]
    s_chunk, nz_chunk = chunk[..., 0], chunk[..., 1]  # (K, nq)
    sum_q = csum[hi] - csum[lo]
    # mass of P on each chunk's non-empty bins: the chunk sum, plus the outliers folded into the end bins
    # (first bin: chunk 0; last bin: chunk floor((n - 1) nq / n)). Where an end bin is empty its outliers
    # meet q = 0: inf below.
    p_mass = s_chunk.clone()
    p_mass[:, 0] += torch.where(h_lo > 0, out_lo, 0)
    last_chunk = ((n - 1) * nq // n)[:, None]
    p_mass.scatter_add_(1, last_chunk, torch.where(h_last > 0, out_hi, 0)[:, None])
    q_level = s_chunk / (nz_chunk.clamp(min=1) * sum_q[:, None])
    sum_p_logq = torch.where(p_mass > 0, p_mass * torch.log(torch.where(p_mass > 0, q_level, 1)), 0).sum(1)
    kl = (sum_p_logp - sum_p_logq) / total - torch.log(total)
    bad = ((h_lo == 0) & (out_lo > 0)) | ((h_last == 0) & (out_hi > 0))
    return torch.where(bad, torch.inf, kl.clamp(min=0))


def mse_errors(
    hist: torch.Tensor, width: float, first: int, lo: torch.Tensor, hi: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Squared quantization error (summed over values, at bin centres) of each candidate window ``[lo, hi)``.

    Bin ``j`` of ``hist`` covers ``[(first + j) w, (first + j + 1) w)``, centre ``c_j``; the candidate keeps
    ``[a, b] = [(first + lo) w, (first + hi) w]`` on a grid of ``step`` with zero on it. Inside:
    ``(c - step * round(c / step))**2`` per value, the real rounding error (a uniform ``step**2 / 12``
    would ignore that values near zero round to it almost exactly, which matters at 4 bits). Outside:
    ``(c - a)**2`` or ``(c - b)**2``, from prefix sums of ``h``, ``h c`` and ``h c**2``.

    Returns:
        ``(K,)`` float64. Memory: candidates are processed in groups of at most 2**21 (candidate, bin) pairs.
    """
    h = hist.to(torch.float64)
    num = h.shape[0]
    centres = (first + torch.arange(num, device=h.device, dtype=torch.float64) + 0.5) * width
    zero = h.new_zeros(1)
    c0 = torch.cat([zero, h.cumsum(0)])
    c1 = torch.cat([zero, (h * centres).cumsum(0)])
    c2 = torch.cat([zero, (h * centres * centres).cumsum(0)])
    a = (first + lo).to(torch.float64) * width
    b = (first + hi).to(torch.float64) * width
    left = c2[lo] - 2 * a * c1[lo] + a * a * c0[lo]  # sum_{j < lo} h (c - a)^2
    r0, r1, r2 = c0[-1] - c0[hi], c1[-1] - c1[hi], c2[-1] - c2[hi]
    right = r2 - 2 * b * r1 + b * b * r0  # sum_{j >= hi} h (c - b)^2
    inside = torch.empty_like(a)
    j = torch.nonzero(h).flatten()  # empty bins add nothing: skip them
    hj, cj = h[j], centres[j]
    group = max(1, (1 << 21) // max(j.shape[0], 1))
    for k in range(0, lo.shape[0], group):
        s = step[k : k + group, None]
        err = cj - s * torch.round(cj / s)  # (group, nonzero bins)
        keep = (j >= lo[k : k + group, None]) & (j < hi[k : k + group, None])
        inside[k : k + group] = torch.where(keep, err * err, 0) @ hj
    return inside + left.clamp(min=0) + right.clamp(min=0)


def percentile_position(hist: torch.Tensor, q: float) -> float:
    """Position, in bins from the start of ``hist``, below which a fraction ``q`` of the counts lies.

    Linear inside the bin that crosses the fraction; ``q = 0`` gives the start of the first occupied bin,
    ``q = 1`` the end of the last.
    """
    h = hist.to(torch.float64)
    cs = h.cumsum(0)
    target = q * float(cs[-1])
    j = int(((cs >= target) & (h > 0)).to(torch.int8).argmax())
    before = float(cs[j] - h[j])
    return j + min(max((target - before) / float(h[j]), 0.0), 1.0)


def symmetric_candidates(length: int, device, start: int = 128) -> torch.Tensor:
    """Thresholds of the symmetric search, in |x| bins: ``start`` (or all bins, if fewer) up to ``length``."""
    return torch.arange(min(start, length), length + 1, device=device, dtype=torch.int64)


def affine_candidates(g_lo: int, g_hi: int, device, min_bins: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows ``[lo, hi)`` (global bin indices) of the scaled-range family ``[A t, B t]``, ``0 < t <= 1``.

    ``[g_lo, g_hi)`` is the occupied range; ``A = min(g_lo, 0)``, ``B = max(g_hi, 0)``, as the quantized
    range always holds zero. One candidate per bin of the wider side, rounded outwards to bin edges and
    cut to the occupied range: scaling about zero keeps the zero point, so the candidates nest. Windows
    narrower than ``min_bins`` are dropped (the full range always stays).
    """
    a, b = min(g_lo, 0), max(g_hi, 0)
    steps = max(-a, b, 1)
    t = torch.arange(1, steps + 1, device=device, dtype=torch.float64) / steps
    lo = torch.floor(a * t).to(torch.int64).clamp(min=g_lo, max=g_hi - 1)
    hi = torch.maximum(torch.ceil(b * t).to(torch.int64).clamp(max=g_hi), lo + 1)
    keep = (hi - lo >= min(min_bins, g_hi - g_lo)) | (t == 1)
    return lo[keep], hi[keep]


def coarse_to_fine_argmin(score, count: int, coarse: int = COARSE_CANDIDATES) -> int:
    """Index of the last minimum of ``score`` over ``count`` candidates, scoring at most about
    ``3 * coarse`` of them: every ``stride``-th first, then every candidate around the best of those.

    ``score(idx)`` maps an int64 tensor of candidate indices to their scores. Exact where the score is
    unimodal at the scale of ``stride = ceil(count / coarse)`` candidates (the MSE and the affine KL
    curves are, up to noise a few bins wide); with ``count <= coarse`` every candidate is scored.
    """
    stride = -(-count // coarse)
    idx = torch.arange(0, count, stride)
    if stride > 1:
        idx = torch.cat([idx, torch.tensor([count - 1])]).unique()
    best = int(idx[last_argmin(score(idx))])
    if stride == 1:
        return best
    near = torch.arange(max(0, best - stride + 1), min(count, best + stride))
    return int(near[last_argmin(score(near))])


def last_argmin(score: torch.Tensor) -> int:
    """Index of the last minimum (ModelOpt breaks ties towards the wider range)."""
    return score.shape[0] - 1 - int(torch.argmin(score.flip(0)))


def _coarsen_to_reach_zero(
    counts: torch.Tensor, exponent: torch.Tensor, origin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same histogram on a grid where zero lies at most ``B`` bins from the far end of the data.

    The quantized range always holds zero, so the search spans ``[min(lo, 0), max(hi, 0)]``; for data far
    from zero (``[1000, 1001]``) that is millions of fine bins. Coarsening by ``2**k`` (exact) bounds the
    search by ``B`` bins from zero, like TensorRT's bins over ``[0, amax]``.
    """
    num_bins = counts.shape[0]
    occupied = torch.nonzero(counts).flatten()
    g_lo, g_hi = int(origin) + int(occupied[0]), int(origin) + int(occupied[-1]) + 1
    reach = max(-min(g_lo, 0), max(g_hi, 0))
    shift = 0
    while -(-reach >> shift) > num_bins:  # ceil(reach / 2**shift)
        shift += 1
    if shift == 0:
        return counts, exponent, origin
    new_e, new_o = exponent + shift, torch.bitwise_right_shift(origin, shift)
    return regrid(counts, exponent, origin, new_e, new_o), new_e, new_o


def search_range(
    counts: torch.Tensor,
    exponent: torch.Tensor,
    origin: torch.Tensor,
    method: str,
    symmetric: bool,
    levels: int,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """The clipping range ``(lo, hi)`` chosen by ``method`` on a canonical-grid histogram.

    Args:
        counts, exponent, origin: a histogram with at least one count.
        method: ``"kl"``, ``"mse"`` or ``"percentile"``.
        symmetric: search ``[-t, t]`` on |x|, or an affine window on x.
        levels: number of integer levels, ``qmax - qmin + 1``.
        percentile: for ``"percentile"``, in ``(0, 100]``.

    Returns:
        ``(lo, hi)`` as Python floats (exact in float32), ``lo <= 0 <= hi``. The caller clips it to the
        observed min/max.
    """
    counts, exponent, origin = _coarsen_to_reach_zero(counts, exponent, origin)
    w = 2.0 ** int(exponent)
    org = int(origin)
    device = counts.device
    if symmetric:
        hist = abs_histogram(counts, origin)
        hist = hist[: int(torch.nonzero(hist).max()) + 1]
        if method == "percentile":
            t = percentile_position(hist, percentile / 100.0) * w
            return -t, t
        hi = symmetric_candidates(hist.shape[0], device)
        lo = torch.zeros_like(hi)
        if method == "kl":
            # ModelOpt's zero-bin rule: bin 0 takes bin 1's count, so a spike of exact zeros (ReLU,
            # padding) does not dominate the divergence
            if hist.shape[0] > 1:
                hist = torch.cat([hist[1:2], hist[1:]])
            score = kl_divergences(hist, lo, hi, max(levels // 2, 1))
            t = int(hi[last_argmin(score)]) * w
        else:
            step = 2 * hi.to(torch.float64) * w / (levels - 1)
            best = coarse_to_fine_argmin(lambda i: mse_errors(hist, w, 0, lo[i], hi[i], step[i]), len(hi))
            t = int(hi[best]) * w
        return -t, t

    occupied = torch.nonzero(counts).flatten()
    first, last = int(occupied[0]), int(occupied[-1])
    if method == "percentile":
        q = percentile / 100.0
        a = (percentile_position(counts, 1.0 - q) + org) * w
        b = (percentile_position(counts, q) + org) * w
        return min(a, 0.0), max(b, 0.0)
    # as the symmetric search starts at 128 bins for 128 levels, KL windows hold at least one bin a level:
    # narrower ones put a whole chunk in one bin and score near 0 whatever they clip
    min_bins = levels if method == "kl" else 1
    lo, hi = affine_candidates(org + first, org + last + 1, device, min_bins)
    lo, hi = lo - org, hi - org
    if method == "kl":
        best = coarse_to_fine_argmin(lambda i: kl_divergences(counts, lo[i], hi[i], levels), len(hi))
    else:
        a = torch.clamp((lo + org).to(torch.float64) * w, max=0)
        b = torch.clamp((hi + org).to(torch.float64) * w, min=0)
        step = (b - a) / (levels - 1)
        best = coarse_to_fine_argmin(lambda i: mse_errors(counts, w, org, lo[i], hi[i], step[i]), len(hi))
    return min((int(lo[best]) + org) * w, 0.0), max((int(hi[best]) + org) * w, 0.0)
