"""The canonical grid in Triton: the jit helpers every histogram kernel bins with.

The rule is ``mono_quant.grid``'s (kernels never import mono_quant): on grid ``(e, origin)`` value ``x``
lies in bin ``floor(x * 2**-e) - origin``. Here the bin is computed in float32, as the CPU twin does:
``floor(x * 2**-e)`` is exact (a power-of-two scale; tiny negatives are pinned to -1), and for a value on
the grid ``d = floor(x * 2**-e) - origin`` is an integer in ``[0, B)`` computed exactly, because both terms
are integers below ``2**24`` in magnitude (the grid's float32-spacing floor keeps ``|x| * 2**-e < 2**24``
over the range seen, and ``|origin| <= 2**24``) and ``B <= internal_bins(MAX_BINS) = 2**21 + 2``. For a
value off the grid ``d`` may round, but rounding is monotone: ``d >= B`` or ``d < 0`` stays so, and
``x * 2**-e`` overflowing to inf gives ``d = +-inf``; so no value off the grid is ever taken for a bin.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["bin_f32", "choose_grid", "floor_scaled", "inv_width", "move_counts"]


@triton.jit
def inv_width(e):
    """``2**-e`` as float32, built from its bits (exact; ``e`` in ``[-126, 126]`` gives a normal float)."""
    bits = ((127 - e).to(tl.int32)) << 23
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def floor_scaled(x, inv_w):
    """``floor(x * inv_w)``; negatives pinned to ``<= -1``: a tiny negative product can underflow to -0.0,
    and on the GPU the floor flushes a subnormal to -0.0 (``cvt.rmi.ftz``)."""
    q = tl.floor(x * inv_w)
    return tl.where(x < 0, tl.minimum(q, -1.0), q)


@triton.jit
def bin_f32(x, finite, inv_w, origin_f, num_bins_f):
    """Bin of each float32 value as float32 ``d`` and whether the value is finite and on the grid.

    ``origin_f``, ``num_bins_f``: the grid's origin and bin count as float32 scalars (exact). On the grid
    means ``0 <= d < num_bins``, never true for NaN or inf (see the module docstring).
    """
    d = floor_scaled(x, inv_w) - origin_f
    return d, finite & (d >= 0.0) & (d < num_bins_f)


@triton.jit
def choose_grid(mn, mx, num_bins, E_LO: tl.constexpr, E_HI: tl.constexpr):
    """``canonical_grid`` of the finite range ``[mn, mx]`` (float32 scalars): ``(exponent, origin)`` int64,
    the smallest exponent whose bins hold the range, not below the float32 spacing at max ``|x|``; an empty
    range (``mn > mx``) gives ``(E_LO, 0)``. All 253 exponents at once."""
    empty = ~(mn <= mx)
    mn_s = tl.where(empty, 0.0, mn)
    mx_s = tl.where(empty, 0.0, mx)
    exps = E_LO + tl.arange(0, 256)
    valid = exps <= E_HI
    inv = inv_width(tl.minimum(exps, E_HI))
    span = floor_scaled(mx_s, inv) - floor_scaled(mn_s, inv)
    mag = tl.maximum(tl.abs(mn_s), tl.abs(mx_s))
    biased = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # frexp: 0 -> exponent 0 (floor -24); subnormals are below 2**-126 (floor clamps to E_LO)
    e_floor = tl.where(mag == 0.0, -24, tl.where(biased == 0, E_LO, biased - 150))
    e_floor = tl.minimum(tl.maximum(e_floor, E_LO), E_HI)
    ok = valid & (span < num_bins) & (exps >= e_floor)
    new_e = tl.min(tl.where(ok, exps, E_HI), 0)
    new_e = tl.where(empty, E_LO, new_e).to(tl.int64)
    new_o = tl.where(empty, 0, floor_scaled(mn_s, inv_width(new_e)).to(tl.int64))
    return new_e, new_o


@triton.jit
def move_counts(counts_ptr, delta_ptr, num_bins, old_e, old_o, new_e, new_o,
                BLOCK_B: tl.constexpr, HAS_DELTA: tl.constexpr):  # fmt: skip
    """Move one histogram from grid ``(old_e, old_o)`` to the coarser or equal ``(new_e, new_o)`` (old bin
    ``j`` to ``((old_o + j) >> k) - new_o``: integer shifts, exact), adding ``delta`` (``HAS_DELTA``: counts
    on the old grid) first. One program.

    counts: [in, out] int64 ``(num_bins,)``; delta: [in] int64 ``(num_bins,)`` with ``HAS_DELTA``, and
    either way the staging buffer of a move (left holding the staged counts).
    """
    if (new_e != old_e) | (new_o != old_o):
        # stage the old counts in delta, then scatter
        shift = tl.minimum(tl.maximum(new_e - old_e, 0), 62)
        for j0 in range(0, num_bins, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            jm = j < num_bins
            cnt = tl.load(counts_ptr + j, mask=jm, other=0)
            if HAS_DELTA:
                cnt += tl.load(delta_ptr + j, mask=jm, other=0)
            tl.store(delta_ptr + j, cnt, mask=jm)
            tl.store(counts_ptr + j, tl.zeros([BLOCK_B], tl.int64), mask=jm)
        tl.debug_barrier()
        for j0 in range(0, num_bins, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            jm = j < num_bins
            cnt = tl.load(delta_ptr + j, mask=jm, other=0)
            dest = ((old_o + j) >> shift) - new_o
            dest = tl.minimum(tl.maximum(dest, 0), num_bins - 1)
            tl.atomic_add(counts_ptr + dest, cnt, mask=jm & (cnt != 0))
    elif HAS_DELTA:
        for j0 in range(0, num_bins, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            jm = j < num_bins
            add = tl.load(delta_ptr + j, mask=jm, other=0)
            tl.store(counts_ptr + j, tl.load(counts_ptr + j, mask=jm, other=0) + add, mask=jm)
