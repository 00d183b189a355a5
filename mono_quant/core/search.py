"""Threshold searches on a canonical-grid histogram: which clipping range quantizes it best.

All candidates are scored at once, on the histogram's device, in float64. Candidates are windows
``[lo, hi)`` of bins; each objective comes from prefix sums, so the cost is O(candidates * chunks), not
O(candidates * bins). The methods (``METHODS``, one symmetric and one affine search each):

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

from collections.abc import Callable
from typing import NamedTuple

import torch

from mono_quant.grid import abs_histogram, regrid

__all__ = [
    "HISTOGRAM_METHODS",
    "METHODS",
    "affine_candidates",
    "coarse_to_fine_argmin",
    "kl_divergences",
    "last_argmin",
    "mse_errors",
    "percentile_position",
    "search_range",
    "symmetric_candidates",
]

# Candidates scored in the first round of the coarse-to-fine searches (mse; affine kl).
COARSE_CANDIDATES = 256


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
        Memory: candidates are scored in groups of at most ``2**20`` (candidate, chunk) pairs.
    """
    h = hist.to(torch.float64)
    zero = h.new_zeros(1)
    csum = torch.cat([zero, h.cumsum(0)])  # csum[j] = sum(h[:j])
    cnz = torch.cat([zero, (h > 0).to(torch.float64).cumsum(0)])
    prefix = _KLPrefix(csum, torch.stack([csum, cnz], dim=1), torch.cat([zero, _xlogx(h).cumsum(0)]), h)
    group = max(1, (1 << 20) // (nq + 1))
    if lo.shape[0] <= group:
        return _kl_group(prefix, lo, hi, nq)
    return torch.cat(
        [_kl_group(prefix, lo[k : k + group], hi[k : k + group], nq) for k in range(0, lo.shape[0], group)]
    )


class _KLPrefix(NamedTuple):
    csum: torch.Tensor  # (N + 1,) prefix sums of the counts
    csum_cnz: torch.Tensor  # (N + 1, 2): csum beside the prefix counts of the non-empty bins
    chl: torch.Tensor  # (N + 1,) prefix sums of h log h
    h: torch.Tensor  # (N,) the counts, float64


def _kl_group(prefix: _KLPrefix, lo: torch.Tensor, hi: torch.Tensor, nq: int) -> torch.Tensor:
    """``kl_divergences`` of one group of candidates."""
    csum, csum_cnz, chl, h = prefix
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
    at_edges = csum_cnz[edges]  # (K, nq + 1, 2)
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


# --- the methods: each searches |x| (symmetric) or x (affine) ---------------------------------------------
# symmetric(hist, w, levels, percentile) -> t: the range is [-t, t]; hist is the |x| histogram of width w,
#     trimmed after its last occupied bin.
# affine(counts, origin, w, levels, percentile) -> (a, b): the range, before it is widened to hold zero.


def _kl_symmetric(hist: torch.Tensor, w: float, levels: int, percentile: float) -> float:
    hi = symmetric_candidates(hist.shape[0], hist.device)
    # ModelOpt's zero-bin rule: bin 0 takes bin 1's count, so a spike of exact zeros (ReLU, padding) does not
    # dominate the divergence
    if hist.shape[0] > 1:
        hist = torch.cat([hist[1:2], hist[1:]])
    score = kl_divergences(hist, torch.zeros_like(hi), hi, max(levels // 2, 1))
    return int(hi[last_argmin(score)]) * w


def _mse_symmetric(hist: torch.Tensor, w: float, levels: int, percentile: float) -> float:
    hi = symmetric_candidates(hist.shape[0], hist.device)
    lo = torch.zeros_like(hi)
    step = 2 * hi.to(torch.float64) * w / (levels - 1)
    best = coarse_to_fine_argmin(lambda i: mse_errors(hist, w, 0, lo[i], hi[i], step[i]), len(hi))
    return int(hi[best]) * w


def _percentile_symmetric(hist: torch.Tensor, w: float, levels: int, percentile: float) -> float:
    return percentile_position(hist, percentile / 100.0) * w


def _windows(counts: torch.Tensor, origin: int, min_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine candidates as windows of bins of ``counts`` (local indices)."""
    occupied = torch.nonzero(counts).flatten()
    first, last = int(occupied[0]), int(occupied[-1])
    lo, hi = affine_candidates(origin + first, origin + last + 1, counts.device, min_bins)
    return lo - origin, hi - origin


def _kl_affine(counts: torch.Tensor, origin: int, w: float, levels: int, percentile: float):
    # as the symmetric search starts at 128 bins for 128 levels, KL windows hold at least one bin a level:
    # narrower ones put a whole chunk in one bin and score near 0 whatever they clip
    lo, hi = _windows(counts, origin, levels)
    best = coarse_to_fine_argmin(lambda i: kl_divergences(counts, lo[i], hi[i], levels), len(hi))
    return (int(lo[best]) + origin) * w, (int(hi[best]) + origin) * w


def _mse_affine(counts: torch.Tensor, origin: int, w: float, levels: int, percentile: float):
    lo, hi = _windows(counts, origin, 1)
    a = torch.clamp((lo + origin).to(torch.float64) * w, max=0)
    b = torch.clamp((hi + origin).to(torch.float64) * w, min=0)
    step = (b - a) / (levels - 1)
    best = coarse_to_fine_argmin(lambda i: mse_errors(counts, w, origin, lo[i], hi[i], step[i]), len(hi))
    return (int(lo[best]) + origin) * w, (int(hi[best]) + origin) * w


def _percentile_affine(counts: torch.Tensor, origin: int, w: float, levels: int, percentile: float):
    q = percentile / 100.0
    return (percentile_position(counts, 1.0 - q) + origin) * w, (percentile_position(counts, q) + origin) * w


class Method(NamedTuple):
    symmetric: Callable[..., float]
    affine: Callable[..., tuple[float, float]]


METHODS: dict[str, Method] = {
    "kl": Method(_kl_symmetric, _kl_affine),
    "mse": Method(_mse_symmetric, _mse_affine),
    "percentile": Method(_percentile_symmetric, _percentile_affine),
}
HISTOGRAM_METHODS = tuple(METHODS)


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
        method: a key of ``METHODS``: ``"kl"``, ``"mse"`` or ``"percentile"``.
        symmetric: search ``[-t, t]`` on |x|, or an affine window on x.
        levels: number of integer levels, ``qmax - qmin + 1``.
        percentile: for ``"percentile"``, in ``(0, 100]``.

    Returns:
        ``(lo, hi)`` as Python floats (exact in float32), ``lo <= 0 <= hi``. The caller clips it to the
        observed min/max.
    """
    search = METHODS[method]
    counts, exponent, origin = _coarsen_to_reach_zero(counts, exponent, origin)
    w = 2.0 ** int(exponent)
    if symmetric:
        hist = abs_histogram(counts, origin)
        hist = hist[: int(torch.nonzero(hist).max()) + 1]
        t = search.symmetric(hist, w, levels, percentile)
        return -t, t
    a, b = search.affine(counts, int(origin), w, levels, percentile)
    return min(a, 0.0), max(b, 0.0)
