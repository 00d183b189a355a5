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

__all__ = ["bin_f32", "floor_scaled", "inv_width"]


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
