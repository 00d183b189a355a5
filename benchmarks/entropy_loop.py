"""Baselines for the KL threshold search: the per-candidate loops of TensorRT / ModelOpt entropy calibration.

Both score every candidate threshold of ``i`` bins (``start_bin <= i <= len(hist)``) one at a time, the
way TensorRT's entropy calibrator and ModelOpt's ``_compute_amax_entropy`` do, and return the last
minimum, so they pick the same threshold as ``mono_quant.core.search.kl_divergences`` (which scores
all candidates at once from prefix sums). Written here for the benchmarks, from the published algorithm:

- the histogram is of |x|; bin 0 takes bin 1's count (a spike of exact zeros would dominate otherwise);
- ``P`` = the first ``i`` bins with everything beyond them added to bin ``i - 1``;
- ``Q`` = the first ``i`` bins merged into ``nq`` chunks (bin ``b`` in chunk ``floor(b * nq / i)``), each
  chunk's sum spread evenly over its non-empty bins, empty bins left empty;
- score ``KL(P || Q)`` of the normalized vectors; ``inf`` where ``P > 0`` and ``Q = 0``.

``loop_python`` keeps the per-bin Python loops of the original (its cost is what users of those tools
wait for); ``loop_numpy`` vectorizes each candidate with numpy and keeps only the loop over candidates.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kl_numpy", "loop_numpy", "loop_python"]


def _prepare(hist) -> np.ndarray:
    h = np.array(hist, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"hist must be a non-empty 1-D array of counts, got shape {h.shape}")
    if h.size > 1:
        h[0] = h[1]
    return h


def kl_numpy(p: np.ndarray, q: np.ndarray) -> float:
    """``sum(p log(p / q))`` of ``p`` and ``q`` normalized to sum 1 (``inf`` where ``p > 0 = q``)."""
    p = p / p.sum()
    q = q / q.sum()
    on = p > 0
    if np.any(q[on] == 0):
        return float("inf")
    return float(np.sum(p[on] * np.log(p[on] / q[on])))


def _last_argmin(divergences: list[float]) -> int:
    d = np.asarray(divergences)
    return len(d) - 1 - int(np.argmin(d[::-1]))


def loop_numpy(hist, nq: int = 128, start_bin: int = 128) -> tuple[int, np.ndarray]:
    """The threshold, in bins, with one numpy-vectorized pass per candidate.

    Args:
        hist: ``(N,)`` counts of |x| (any array-like).
        nq: quantized levels on one side (128 for int8).
        start_bin: smallest candidate (all bins if the histogram is shorter).

    Returns:
        ``(bins, divergences)``: the chosen number of bins and the ``(K,)`` scores of candidates
        ``min(start_bin, N) .. N``.
    """
    h = _prepare(hist)
    n = h.size
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[i] = sum(h[i:])
    divergences = []
    for i in range(min(start_bin, n), n + 1):
        p = h[:i].copy()
        p[-1] += tail[i]
        chunk = np.arange(i) * nq // i
        nonzero = h[:i] > 0
        sums = np.bincount(chunk, weights=h[:i], minlength=nq)
        nz = np.bincount(chunk, weights=nonzero, minlength=nq)
        q = np.where(nonzero, sums[chunk] / np.maximum(nz[chunk], 1), 0.0)
        divergences.append(kl_numpy(p, q))
    first = min(start_bin, n)
    return first + _last_argmin(divergences), np.asarray(divergences)


def loop_python(hist, nq: int = 128, start_bin: int = 128) -> tuple[int, np.ndarray]:
    """The same threshold with the per-bin Python loops of ModelOpt's entropy calibration.

    Each candidate walks its bins in Python three times (assign chunks, sum chunks, expand them back),
    as the reference implementations do: O(N^2) interpreted steps, seconds at 2048 bins.

    Args and Returns: as ``loop_numpy``.
    """
    h = _prepare(hist)
    n = h.size
    divergences = []
    for i in range(min(start_bin, n), n + 1):
        chunk_of = [b * nq // i if h[b] > 0 else -1 for b in range(i)]
        chunk_sum = [0.0] * nq
        chunk_nz = [0] * nq
        for b in range(i):
            c = chunk_of[b]
            if c != -1:
                chunk_sum[c] += h[b]
                chunk_nz[c] += 1
        q = np.zeros(i)
        for b in range(i):
            c = chunk_of[b]
            if c != -1:
                q[b] = chunk_sum[c] / chunk_nz[c]
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        divergences.append(kl_numpy(p, q))
    first = min(start_bin, n)
    return first + _last_argmin(divergences), np.asarray(divergences)
