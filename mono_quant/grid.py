"""The canonical grid: the histogram's bins, exact on every backend and under any merge.

Bin width is a power of two ``w = 2**e`` and edges sit at integer multiples of ``w``: on grid
``(e, origin)`` with ``B`` bins, bin ``j`` covers ``[(origin + j) * w, (origin + j + 1) * w)``. A value's bin
is ``floor(x * 2**-e) - origin``; multiplying by a power of two is exact, so every backend (torch on any
device, the Triton kernels, the interpreter) bins every value identically. The grid is a function of the
finite min and max seen, never of the order:

- ``e`` is the smallest integer in ``[E_MIN, E_MAX]`` with ``floor(max / w) - floor(min / w) < B``, but
  never below ``floor(log2(max|x|)) - 23`` (the float32 spacing at the largest magnitude: finer bins cannot
  hold distinct values, and it keeps ``|x| * 2**-e < 2**24``, exact in float32 and int32);
- ``origin = floor(min / w)``.

Both rules are monotone in the range, so growing the range only coarsens: old bin ``j`` moves to
``((origin + j) >> k) - origin'`` for ``k = e' - e`` (integer arithmetic, exact). Merging two histograms
(``state.merge_histograms``) coarsens both onto the grid of their combined range and adds counts, so merging
is associative and commutative, and any batching, order or rank split ends on the same grid with the same
counts.

``B = internal_bins(bins) = max(2 * bins + 2, 8)``: a power-of-two width wastes up to half the range, so
twice the user's bins (plus two for the partial bins at the ends) guarantee a width no coarser than
``(max - min) / bins``, except where the float32-spacing floor above says no finer bins can exist.

Zero is always an edge, so the histogram of ``|x|`` is an exact fold of the signed one (``abs_histogram``).
"""

from __future__ import annotations

import torch

__all__ = [
    "E_MAX",
    "E_MIN",
    "MAX_BINS",
    "abs_histogram",
    "bin_edges",
    "bin_index",
    "canonical_grid",
    "floor_scaled",
    "internal_bins",
    "regrid",
    "regrid_to_range",
]

E_MIN, E_MAX = -126, 126  # 2**-e stays a normal float32 for every e in range
# The largest ``bins`` an observer takes. Bin numbers travel as float32 on some paths (the CPU binning, the
# kernels' bin centres ``j + 0.5`` for torch.histc), exact while ``internal_bins(bins) <= 2**23``.
MAX_BINS = 1 << 20


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
    """The grid ``(exponent, origin)`` (int64, of ``min_val``'s shape) of data whose finite range is
    ``[min_val, max_val]``; elementwise for ranges of any shape (one grid per segment of a segmented state).

    Pure tensor ops, no host read: usable inside a CUDA graph. For an empty range (``min > max``, nothing
    finite seen) returns the finest grid ``(E_MIN, 0)``, which any later range coarsens from.
    """
    device = min_val.device
    mn = min_val.to(torch.float32)
    mx = max_val.to(torch.float32)
    exps = torch.arange(E_MIN, E_MAX + 1, device=device, dtype=torch.int64)
    inv_w = torch.ldexp(torch.ones_like(exps, dtype=torch.float32), -exps).to(torch.float32)
    span = floor_scaled(mx[..., None], inv_w) - floor_scaled(mn[..., None], inv_w)
    _, mag_exp = torch.frexp(torch.maximum(mn.abs(), mx.abs()))
    e_floor = (mag_exp.to(torch.int64) - 1 - 23).clamp(E_MIN, E_MAX)
    ok = (span < num_bins) & (exps >= e_floor[..., None])
    # exps is increasing and `ok` is monotone in it: the first True is the smallest valid e.
    exponent = torch.where(ok, exps, E_MAX).amin(-1)
    empty = ~(mn <= mx)
    exponent = torch.where(empty, E_MIN, exponent)
    inv = torch.ldexp(torch.ones_like(mn), -exponent).to(torch.float32)
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
    range guarantees; indices are clamped only so that empty bins of an empty state stay in range. Counts
    of shape ``(..., B)`` hold one histogram per leading index, each on its grid (grids of shape ``...``).
    """
    num_bins = counts.shape[-1]
    shift = (new_exponent - exponent).clamp(0, 62)[..., None]
    j = torch.arange(num_bins, device=counts.device, dtype=torch.int64)
    dest = torch.bitwise_right_shift(origin[..., None] + j, shift) - new_origin[..., None]
    dest = dest.clamp(0, num_bins - 1)
    if counts.dim() == 1:
        return torch.zeros_like(counts).index_add_(0, dest, counts)
    rows = torch.arange(counts[..., 0].numel(), device=counts.device).reshape(counts.shape[:-1])
    flat = (dest + rows[..., None] * num_bins).reshape(-1)  # each histogram's bins in its own row
    return torch.zeros_like(counts).reshape(-1).index_add_(0, flat, counts.reshape(-1)).reshape(counts.shape)


def regrid_to_range(
    counts: torch.Tensor,
    exponent: torch.Tensor,
    origin: torch.Tensor,
    min_val: torch.Tensor,
    max_val: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A histogram moved onto the canonical grid of a range that contains its data: ``(e, origin, counts)``.

    The one step of every exact merge: two histograms (``state.merge_histograms``), the ranks of a sync
    (``distributed``), a histogram and a batch that grew the range.
    """
    new_e, new_o = canonical_grid(min_val, max_val, counts.shape[0])
    return new_e, new_o, regrid(counts, exponent, origin, new_e, new_o)


def bin_edges(exponent: torch.Tensor, origin: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The ``num_bins + 1`` edges of a grid, float64 (exact: integers times a power of two)."""
    j = torch.arange(num_bins + 1, device=origin.device, dtype=torch.float64)
    return torch.ldexp(origin.to(torch.float64) + j, exponent)


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
