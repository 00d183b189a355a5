"""The one-read binning kernels of ``histogram.py``: a fused pass, the off-grid values, the rows' reduction.

``_pass_kernel`` reads ``x`` once: each persistent program keeps the min/max partials (``_common``) and
counts every value into per-program int32 counters (``_smem``) against the grid in device memory, in slot

- ``d``, its bin, when the value is finite and on the grid;
- ``NBS - 3 + par`` when finite but off the grid (the range grew past it in this batch; ``par``
  alternates per tile, see ``_pass_tile``);
- ``NBS - 1``, the dump slot, for NaN, +-Inf and lanes past ``n``.

Every lane counts somewhere, so the counting is unpredicated. A program notes the tiles where it met
values off the grid in its side buffer (``SIDE`` tile numbers) and flushes its counters once: a row of an
int32 ``(P, NBS)`` scratch (``ROWS``), which ``_rows_reduce_kernel`` adds up, or integer atomics of the
non-zero counters. The finalize (``histogram.py``) adds the batch's counts, still on the old grid, to
the histogram and moves both to the new grid exactly. ``_offgrid_kernel`` then counts, on the new grid,
the values that were off the old one: from the tiles noted, or, when a program met more than ``SIDE``
such tiles, from all its tiles. In steady state nothing is off the grid: ``x`` is read once and the
off-grid kernel's programs exit at once.

``COUNTERS`` also takes ``"global"``: no per-program counters, a relaxed int64 atomic into the histogram
per value on the grid (the ``"atomic"`` binning; nothing to flush).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import accumulate_partials, load_finite, load_kept, store_partials
from ._grid import bin_f32, inv_width
from ._smem import counters_add, counters_declare, counters_flush, counters_read, counters_zero

__all__ = []  # kernels for histogram.py only


@triton.jit
def _load_tile(
    x_ptr, t, n, keep_ptr, keep_div, BLOCK: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr
):
    """Tile ``t`` of ``x`` as float32, which lanes are finite and which count (in ``x`` and, ``HAS_MASK``,
    under a True entry ``keep[i // keep_div]`` of the token mask). ``MASKED``: the ragged last tile (or any
    tile); otherwise the tile is full and loads unmasked (but for the token mask), so the loads vectorize."""
    offs = (t + tl.zeros([], tl.int64)) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        x, finite, mask = load_kept(x_ptr, offs, offs < n, keep_ptr, offs // keep_div, HAS_MASK)
    elif HAS_MASK:
        mask = tl.load(keep_ptr + offs // keep_div) != 0
        x, finite = load_finite(x_ptr, offs, mask)
    else:
        mask = tl.full([BLOCK], 1, tl.int1)
        x = tl.load(x_ptr + offs, eviction_policy="evict_first").to(tl.float32)
        finite = tl.abs(x) <= 3.4028234663852886e38  # load_finite's rule, unmasked
    return x, finite, mask


@triton.jit
def _count(base, local, out_ptr, slot, NBS: tl.constexpr, NBP: tl.constexpr, COUNTERS: tl.constexpr):
    """Count every lane once at ``slot`` (int32). ``"global"``: a relaxed int64 atomic into ``out`` for the
    lanes on the grid (``slot < NBS - 3``); otherwise this program's counters (``_smem.counters_add``)."""
    if COUNTERS == "global":
        one = tl.full(slot.shape, 1, tl.int64)
        tl.atomic_add(out_ptr + slot, one, mask=slot < NBS - 3, sem="relaxed")
    else:
        local = counters_add(base, local, slot, NBP, COUNTERS)
    return local


@triton.jit
def _pass_tile(
    x_ptr, t, n, inv_w, origin_f, num_bins_f, base, local, out_ptr, side_ptr, mn, mx, bad, side_n, par,
    snap0, snap1, keep_ptr, keep_div, BLOCK: tl.constexpr, NBS: tl.constexpr, NBP: tl.constexpr,
    SIDE: tl.constexpr, COUNTERS: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """One tile of ``_pass_kernel``: min/max partials, counting, and the tile noted if it held values off
    the grid.

    With counters in shared memory (or their scratch twin) whether the tile held any is read back from
    its off-grid slot after a barrier: ``snap0`` / ``snap1`` are the two slots' values at the last read,
    and with two slots alternating per tile the next tile can count while a slow warp still reads this
    one's, so one barrier per tile suffices. Otherwise (``tl.histogram``, ``"global"``) it is a sum.
    """
    x, finite, mask = _load_tile(x_ptr, t, n, keep_ptr, keep_div, BLOCK, MASKED, HAS_MASK)
    mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
    d, inside = bin_f32(x, finite, inv_w, origin_f, num_bins_f)
    off = finite & ~inside
    rejected = tl.where(off, (NBS - 3 + par).to(tl.float32), NBS - 1.0)
    local = _count(base, local, out_ptr, tl.where(inside, d, rejected).to(tl.int32), NBS, NBP, COUNTERS)
    if COUNTERS == "ptx" or COUNTERS == "scratch":
        tl.debug_barrier()
        cur = counters_read(base, NBS - 3 + par, COUNTERS)
        noff = cur - tl.where(par == 0, snap0, snap1)
        snap0 = tl.where(par == 0, cur, snap0)
        snap1 = tl.where(par == 0, snap1, cur)
    else:
        noff = tl.sum(off.to(tl.int32), 0)
    if noff > 0:  # rare in steady state: the range grew in this tile
        if side_n < SIDE:
            tl.store(side_ptr + side_n, t + tl.zeros([], tl.int32))
        side_n += 1
    return mn, mx, bad, local, side_n, 1 - par, snap0, snap1


@triton.jit
def _pass_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    side_ptr,
    side_n_ptr,
    cnt_ptr,
    out_ptr,
    exp_ptr,
    org_ptr,
    keep_ptr,
    n,
    num_full,
    num_bins,
    keep_div,
    BLOCK: tl.constexpr,
    NBS: tl.constexpr,
    NBP: tl.constexpr,
    SIDE: tl.constexpr,
    COUNTERS: tl.constexpr,
    ROWS: tl.constexpr,
    DECL: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Min/max partials of ``x`` and its counts against the grid in device memory, in one read.

    x: [in] ``(n,)`` contiguous, ``num_full = n // BLOCK`` full tiles. pmin, pmax: [out] float32 ``(P,)``;
    pbad: [out] int64 ``(P,)``. side: [out] int32 ``(P, SIDE)``, the first tiles of each program that held
    values off the grid; side_n: [out] int32 ``(P,)``, how many tiles did (may pass ``SIDE``).
    cnt: int32 ``(P, NBS)``, the ``"scratch"`` counters. out: [in, out] ``ROWS``: int32 ``(P, NBS)``, each
    program's row written; otherwise int64 ``(num_bins,)``, added to. exp, org: [in] int64 ``()``, the grid.
    keep: [in] uint8, the token mask (``HAS_MASK``): value ``i`` counts where ``keep[i // keep_div]``; the
    others go to the dump slot and are not counted as non-finite.
    ``NBS >= num_bins + 3`` counters per program (``NBP``: a power of two >= ``NBS``, for
    ``"tl_histogram"``); ``COUNTERS``: ``"ptx"``, ``"scratch"``, ``"tl_histogram"`` or ``"global"``;
    ``DECL``: the PTX that declares the ``"ptx"`` counters.
    Grid: ``(P,)``; program ``p`` reads full tiles ``p, p + P, ...``, then the ragged last tile if it is
    next in that order.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    counters_declare(pid, COUNTERS, DECL)
    base, local = counters_zero(cnt_ptr, pid, NBS, NBP, COUNTERS)
    inv_w = inv_width(tl.load(exp_ptr))
    origin_f = tl.load(org_ptr).to(tl.float32)  # |origin| <= 2**24: exact
    num_bins_f = num_bins.to(tl.float32)
    side_ptr += pid.to(tl.int64) * SIDE
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    side_n = pid * 0
    par = pid * 0
    snap0 = pid * 0
    snap1 = pid * 0
    for t in range(pid, num_full, nprog):
        mn, mx, bad, local, side_n, par, snap0, snap1 = _pass_tile(
            x_ptr, t, n, inv_w, origin_f, num_bins_f, base, local, out_ptr, side_ptr, mn, mx, bad, side_n,
            par, snap0, snap1, keep_ptr, keep_div, BLOCK, NBS, NBP, SIDE, COUNTERS, False, HAS_MASK,
        )  # fmt: skip
    if (num_full % nprog == pid) & ((num_full + tl.zeros([], tl.int64)) * BLOCK < n):
        mn, mx, bad, local, side_n, par, snap0, snap1 = _pass_tile(
            x_ptr, num_full, n, inv_w, origin_f, num_bins_f, base, local, out_ptr, side_ptr, mn, mx, bad,
            side_n, par, snap0, snap1, keep_ptr, keep_div, BLOCK, NBS, NBP, SIDE, COUNTERS, True, HAS_MASK,
        )  # fmt: skip
    store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad)
    tl.store(side_n_ptr + pid, side_n)
    if COUNTERS != "global":
        if ROWS:
            out_ptr += pid.to(tl.int64) * NBS
        counters_flush(base, local, out_ptr, num_bins, NBS, NBP, COUNTERS, ROWS)


@triton.jit
def _offgrid_tile(
    x_ptr, t, n, inv_old, origin_old_f, inv_w, origin_f, num_bins_f, base, local, out_ptr, keep_ptr,
    keep_div, BLOCK: tl.constexpr, NBS: tl.constexpr, NBP: tl.constexpr, COUNTERS: tl.constexpr,
    MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Count on the new grid the values of tile ``t`` that were off the old one (the rest: the dump slot)."""
    x, finite, mask = _load_tile(x_ptr, t, n, keep_ptr, keep_div, BLOCK, MASKED, HAS_MASK)
    _, on_old = bin_f32(x, finite, inv_old, origin_old_f, num_bins_f)
    d, inside = bin_f32(x, finite & ~on_old, inv_w, origin_f, num_bins_f)
    return _count(base, local, out_ptr, tl.where(inside, d, NBS - 1.0).to(tl.int32), NBS, NBP, COUNTERS)


@triton.jit
def _offgrid_kernel(
    x_ptr,
    side_ptr,
    side_n_ptr,
    cnt_ptr,
    out_ptr,
    exp_ptr,
    org_ptr,
    old_grid_ptr,
    keep_ptr,
    n,
    num_full,
    num_bins,
    keep_div,
    BLOCK: tl.constexpr,
    NBS: tl.constexpr,
    NBP: tl.constexpr,
    SIDE: tl.constexpr,
    COUNTERS: tl.constexpr,
    ROWS: tl.constexpr,
    DECL: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Count on the new grid what ``_pass_kernel`` met off the old one. Same grid ``(P,)``, same tiles.

    A program re-reads the tiles it noted in its side buffer, or all its tiles when it noted more than
    ``SIDE``, and counts the values that were off the old grid (old_grid: [in] int64 ``(2,)``, exponent
    and origin, saved by the finalize) on the new one (exp, org: [in] int64 ``()``), then flushes: ``ROWS``:
    its row of ``out`` ([out] int32 ``(P, NBS)``); otherwise into ``out`` ([in, out] int64 ``(num_bins,)``,
    the histogram). A program that noted nothing exits at once and writes nothing. Other pointers as in
    ``_pass_kernel``.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    counters_declare(pid, COUNTERS, DECL)
    met = tl.load(side_n_ptr + pid)
    if met > 0:
        base, local = counters_zero(cnt_ptr, pid, NBS, NBP, COUNTERS)
        inv_w = inv_width(tl.load(exp_ptr))
        origin_f = tl.load(org_ptr).to(tl.float32)
        inv_old = inv_width(tl.load(old_grid_ptr))
        origin_old_f = tl.load(old_grid_ptr + 1).to(tl.float32)
        num_bins_f = num_bins.to(tl.float32)
        if met <= SIDE:
            side_ptr += pid.to(tl.int64) * SIDE
            for i in range(0, met):
                local = _offgrid_tile(
                    x_ptr, tl.load(side_ptr + i), n, inv_old, origin_old_f, inv_w, origin_f, num_bins_f,
                    base, local, out_ptr, keep_ptr, keep_div, BLOCK, NBS, NBP, COUNTERS, True, HAS_MASK,
                )  # fmt: skip
        else:
            for t in range(pid, num_full, nprog):
                local = _offgrid_tile(
                    x_ptr, t, n, inv_old, origin_old_f, inv_w, origin_f, num_bins_f, base, local, out_ptr,
                    keep_ptr, keep_div, BLOCK, NBS, NBP, COUNTERS, False, HAS_MASK,
                )  # fmt: skip
            if (num_full % nprog == pid) & ((num_full + tl.zeros([], tl.int64)) * BLOCK < n):
                local = _offgrid_tile(
                    x_ptr, num_full, n, inv_old, origin_old_f, inv_w, origin_f, num_bins_f, base, local,
                    out_ptr, keep_ptr, keep_div, BLOCK, NBS, NBP, COUNTERS, True, HAS_MASK,
                )  # fmt: skip
        if COUNTERS != "global":
            if ROWS:
                out_ptr += pid.to(tl.int64) * NBS
            counters_flush(base, local, out_ptr, num_bins, NBS, NBP, COUNTERS, ROWS)


@triton.jit
def _rows_reduce_kernel(
    rows_ptr,
    side_n_ptr,
    out_ptr,
    num_rows,
    num_bins,
    rows_per_split,
    NBS: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[c] += sum(rows[r, c])`` over this program's rows ``r``, for bins ``c < num_bins``.

    rows: [in] int32 ``(num_rows, NBS)``. out: [in, out] int64 ``(num_bins,)`` (a relaxed atomic per bin
    and program). ``GATED``: only the rows ``r`` with ``side_n[r] > 0`` ([in] int32 ``(num_rows,)``: the
    programs of ``_offgrid_kernel`` that wrote theirs).
    Grid: ``(cdiv(num_bins, BLOCK_C), cdiv(num_rows, rows_per_split))``.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < num_bins
    r0 = tl.program_id(1) * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, num_rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.int64)
    for r in range(r0, r1, BLOCK_R):
        rr = r + tl.arange(0, BLOCK_R)
        rmask = rr < r1
        if GATED:
            rmask &= tl.load(side_n_ptr + rr, mask=rmask, other=0) > 0
        offs = rr.to(tl.int64)[:, None] * NBS + cols[None, :]
        acc += tl.load(rows_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0).to(tl.int64)
    total = tl.sum(acc, 0)
    tl.atomic_add(out_ptr + cols, total, mask=cmask & (total != 0), sem="relaxed")
