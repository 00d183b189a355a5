"""Segmented canonical-grid histogram (MoE experts): the rows of ``x`` routed to E histograms, sync-free.

Maths (the twin: ``mono_quant.reference_segments.histogram_segments_update_``): per segment ``e`` the
histogram update of the rows routed to it, in three launches and no host read:

1. the segmented min/max kernel (``segments``, min/max mode): each segment's new range, ``seen``,
   ``tokens_seen`` and the count of routing entries outside ``[0, E)``;
2. ``_grid_kernel``, one program a segment: the canonical grid of its range (``_grid.choose_grid``) and its
   old counts moved onto it (``_grid.move_counts``: integer shifts, exact); a segment that got no row keeps
   its grid, the canonical one of an unchanged range;
3. ``_bin_kernel``, persistent programs over the rows: each kept finite value of a row binned on the grid of
   every segment the row lists (once per segment, as ``segments._slot`` dedups), counted by a relaxed int64
   atomic into ``counts[e, bin]``. Every value lies on its segment's new grid (the range holds it).

Counts are integers, so the order of the atomics never shows: the result is that of the twin, exactly.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import triton
import triton.language as tl

from ._common import launch_options, load_kept, max_programs, prepare_input, prepare_mask
from ._grid import bin_f32, choose_grid, inv_width, move_counts
from .segments import _slot, minmax_segments_update_

__all__ = ["histogram_segments_update_"]

BLOCK = 1024  # values per tile of a row; 8 warps (at 4 the masked binning spills its int64 mask indices)
E_MIN, E_MAX = -126, 126
_Ranges = namedtuple("_Ranges", "running_min running_max seen tokens_seen invalid")


@triton.jit
def _grid_kernel(rmin_ptr, rmax_ptr, exp_ptr, org_ptr, counts_ptr, stage_ptr, num_bins,
                 BLOCK_B: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr):  # fmt: skip
    """Segment ``e = program_id(0)`` onto the canonical grid of its range.

    rmin, rmax: [in] float32 ``(E,)``; exp, org: [in, out] int64 ``(E,)``, the grids; counts: [in, out]
    int64 ``(E, num_bins)``; stage: [out] int64 ``(E, num_bins)``, scratch. Grid: ``(E,)``.
    """
    e = tl.program_id(0)
    new_e, new_o = choose_grid(tl.load(rmin_ptr + e), tl.load(rmax_ptr + e), num_bins, E_LO, E_HI)
    old_e = tl.load(exp_ptr + e)
    old_o = tl.load(org_ptr + e)
    row = (e + tl.zeros([], tl.int64)) * num_bins
    move_counts(counts_ptr + row, stage_ptr + row, num_bins, old_e, old_o, new_e, new_o, BLOCK_B, False)
    tl.store(exp_ptr + e, new_e)
    tl.store(org_ptr + e, new_o)


@triton.jit
def _bin_kernel(x_ptr, seg_ptr, keep_ptr, exp_ptr, org_ptr, counts_ptr, N, INNER, K, E, num_bins, keep_div,
                BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """Count each kept finite value of row ``r`` in the histogram of every segment ``seg[r]`` lists.

    x: [in] ``(N, INNER)`` contiguous; seg: [in] integer ``(N, K)``; keep: [in] uint8, the token mask
    (``HAS_MASK``: value ``v`` counts where ``keep[v // keep_div]``); exp, org: [in] int64 ``(E,)``, the
    grids; counts: [in, out] int64 ``(E, num_bins)``. Grid: ``(P,)`` persistent programs over the rows.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    one = tl.full([BLOCK], 1, tl.int64)
    nb_f = num_bins.to(tl.float32)
    for row in range(pid, N, nprog):
        base = (row + tl.zeros([], tl.int64)) * INNER
        for i0 in range(0, INNER, BLOCK):
            offs = base + i0 + lane
            inside_row = (i0 + lane) < INNER
            x, finite, _ = load_kept(x_ptr, offs, inside_row, keep_ptr, offs // keep_div, HAS_MASK)
            for j in range(0, K):
                s, _outside = _slot(seg_ptr, row, j, K, E)
                if s < E:
                    inv_w = inv_width(tl.load(exp_ptr + s))
                    d, inside = bin_f32(x, finite, inv_w, tl.load(org_ptr + s).to(tl.float32), nb_f)
                    at = s * num_bins + tl.where(inside, d, 0.0).to(tl.int64)
                    tl.atomic_add(counts_ptr + at, one, mask=inside, sem="relaxed")


def _check_state(state, tokens_seen: torch.Tensor, invalid: torch.Tensor) -> tuple[int, int]:
    e, b = state.counts.shape if state.counts.dim() == 2 else (0, 0)
    want = {
        "running_min": (torch.float32, (e,)),
        "running_max": (torch.float32, (e,)),
        "seen": (torch.int64, (e, 4)),
        "exponent": (torch.int64, (e,)),
        "origin": (torch.int64, (e,)),
        "counts": (torch.int64, (e, b)),
    }
    for name, (dtype, shape) in want.items():
        t = getattr(state, name)
        if e == 0 or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape} (E segments, B "
                             f"bins), got {t.dtype} {tuple(t.shape)}")  # fmt: skip
    if tuple(tokens_seen.shape) != (e,) or tuple(invalid.shape) != ():
        raise ValueError(f"tokens_seen must be ({e},) and invalid () int64, got {tuple(tokens_seen.shape)} "
                         f"and {tuple(invalid.shape)}")  # fmt: skip
    return e, b


def histogram_segments_update_(
    x: torch.Tensor,
    segments: torch.Tensor,
    state,
    tokens_seen: torch.Tensor,
    invalid: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """Add the rows of ``x`` to the histogram of each segment they are routed to, in place, in three
    launches with nothing read on the host (see the twin for the maths).

    Args:
        x: [in] non-empty float tensor ``[N, ...]`` (fp32/bf16/fp16 read natively, fp64 cast in registers).
        segments: [in] integer ``[N]`` or ``[N, k]``; entries outside ``[0, E)`` are dropped and counted in
            ``invalid``.
        state: [in, out] a segmented histogram state: ``running_min``, ``running_max`` float32 ``(E,)``;
            ``seen`` int64 ``(E, 4)``; ``exponent``, ``origin`` int64 ``(E,)``; ``counts`` int64 ``(E, B)``.
        tokens_seen: [in, out] int64 ``(E,)``; invalid: [in, out] int64 ``()``.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``.

    Raises:
        ValueError: bad state buffers, ``segments`` shape or mask.
    """
    num_segments, num_bins = _check_state(state, tokens_seen, invalid)
    x = prepare_input(x)
    ranges = _Ranges(state.running_min, state.running_max, state.seen, tokens_seen, invalid)
    minmax_segments_update_(x, segments, ranges, None, mask=mask)  # checks segments and mask
    stage = torch.empty_like(state.counts)
    big = num_bins > 1 << 16
    _grid_kernel[(num_segments,)](
        state.running_min, state.running_max, state.exponent, state.origin, state.counts, stage, num_bins,
        BLOCK_B=4096 if big else 1024, E_LO=E_MIN, E_HI=E_MAX, **launch_options(8 if big else 4),
    )  # fmt: skip
    n = x.shape[0]
    keep, _, keep_div, has_mask = prepare_mask(x, mask)
    seg = segments.reshape(n, -1)
    seg = seg if seg.is_contiguous() else seg.contiguous()
    programs = max(min(n, max_programs(x)), 1)
    _bin_kernel[(programs,)](
        x, seg, keep, state.exponent, state.origin, state.counts, n, x[0].numel(), seg.shape[1],
        num_segments, num_bins, keep_div, BLOCK=BLOCK, HAS_MASK=has_mask, **launch_options(8),
    )  # fmt: skip
