"""The histogram twin in plain torch: ``histogram_update_``, the canonical-grid histogram update
(regrid the old counts to the range seen so far, then bin the batch). Twin of
``mono_quant.kernels.histogram``; the grid rule is that of ``mono_quant.grid``; the contract (non-finite
values, token masks, no host read on CUDA) is that of ``mono_quant.reference``.
"""

from __future__ import annotations

import torch

from mono_quant.grid import canonical_grid, floor_scaled, regrid
from mono_quant.reference_range import (
    _count_,
    _finite_minmax_masked,
    _float32_values,
    _may_branch,
    _update_range_,
    finite_minmax,
)
from mono_quant.rows import keep_view, kept_rows, masked_values, pieces
from mono_quant.state import HistogramState

__all__ = ["histogram_update_"]

# Elements per chunk where a float32 temporary is needed: bounds the extra memory of bf16/fp16 inputs to
# 16 MiB whatever the tensor size.
CHUNK = 1 << 22
# Elements per binning step on the CPU: small enough that the temporaries stay in cache.
BIN_CHUNK = 1 << 16


def histogram_update_(x: torch.Tensor, state: HistogramState, *, mask: torch.Tensor | None = None) -> None:
    """Add the finite values of ``x`` to a canonical-grid histogram, in place.

    The new grid is ``canonical_grid`` of the range seen so far, the old counts move to it exactly, then
    ``x`` is binned on it (see ``mono_quant.grid``).

    Args:
        x: non-empty float tensor. state: the histogram, updated in place.
        mask: ``None``, or a bool tensor of the leading dims of ``x`` (module docstring).
    """
    exponent, origin, counts = state.exponent, state.origin, state.counts
    num_bins = counts.shape[0]
    x = _float32_values(x)
    host = _may_branch(x)
    mn, mx, bad = finite_minmax(x) if mask is None else _finite_minmax_masked(x, mask)
    # the grid is a function of the range: on CPU, a batch inside the range seen skips the grid work
    grows = not host or mn.item() < state.running_min.item() or mx.item() > state.running_max.item()
    if grows:
        _update_range_(state.range, mn, mx, None)
        new_e, new_o = canonical_grid(state.running_min, state.running_max, num_bins)
        counts.copy_(regrid(counts, exponent, origin, new_e, new_o))
        exponent.copy_(new_e)
        origin.copy_(new_o)
    if host:  # the grid as Python numbers: 2**-e and origin (|origin| <= 2**24) are exact float32 scalars
        e = int(exponent)
        inv_w, offset = 2.0**-e, float(origin)
    else:
        e = None
        inv_w = torch.ldexp(torch.ones((), dtype=torch.float32, device=x.device), -exponent).to(torch.float32)
        offset = origin.to(torch.float32)
    # x * 2**-e underflows only for a coarse grid (e > 0); on CPU the fix-up pass is skipped otherwise
    fix_underflow = not host or e > 0
    step = BIN_CHUNK if host else CHUNK
    kept = None if mask is None else kept_rows(x, mask, step)
    all_finite = host and int(bad) == 0 and (mask is None or kept is not None)
    if mask is None:
        flat = x.reshape(-1)
        work = ((c, None) for c in ((flat,) if flat.numel() <= step else flat.split(step)))
    elif kept is not None:  # CPU: the kept rows, gathered in pieces
        work = ((c, None) for p in kept for c in p.reshape(-1).split(step))
    else:  # pieces of x and of the mask broadcast to it (views), each flattened (bounded copies)
        work = ((p.reshape(-1), k.reshape(-1)) for p, k, _ in pieces(x, keep_view(x, mask), step))
    for chunk, keep in work:
        chunk = chunk.to(torch.float32)
        if fix_underflow:  # a tiny negative can underflow to -0.0, whose floor is 0: pinned to -1
            t = floor_scaled(chunk, inv_w)
        else:
            t = chunk * inv_w  # exact: a power of two
            t.floor_()
        t -= offset  # both integers of magnitude <= 2**24 (the grid's rule), bins < B <= 2**21 + 2: exact
        if keep is not None:
            t = torch.where(keep, t, -1.0)  # masked values: outside histc's range, as NaN
        if all_finite:  # every t is a bin number in [0, B): bincount is 4x faster than histc on CPU
            # int32 holds every bin number (B <= 2**21 + 2); the CPU converts float32 to int32 about 10x
            # faster than to int64, and the update of 4M values takes 0.55-0.75x the time
            counts += torch.bincount(t.to(torch.int32), minlength=num_bins)
            continue
        # t holds integer bin numbers; with edges at -0.5, 0.5, ... every integer lands in its own bin
        # whatever histc's rounding, and NaN / +-Inf fall outside and are skipped. Float counts are exact
        # per chunk (< 2**24 values). No data-dependent shape, no host read.
        counts += torch.histc(t, bins=num_bins, min=-0.5, max=num_bins - 0.5).to(torch.int64)
    _count_(state.seen, x.numel(), bad, 0 if mask is None else masked_values(x, mask))
