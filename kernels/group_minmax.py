"""Per-tensor min/max and moving-average updates of many observers in two launches: the kernels behind
``mono_quant.group.ObserverGroup``. Twin: ``mono_quant.group_ops.minmax_update_many_reference``.

The tensors and the observers' state buffers are reached through a table of addresses (int64, cast to
pointers with ``.to(tl.pointer_type(...))`` in the kernel), so the number of launches does not depend on
how many tensors there are:

1. a partial kernel, one program per tile of ``BLOCK`` values of any tensor: the program finds its tensor by
   a binary search over the tensors' first tiles, loads the tile in the tensor's own dtype (a runtime
   branch on the dtype code: fp32 / bf16 / fp16 / fp64, cast to float32 in registers) and writes the
   tile's finite min, max and non-finite count (``_common.accumulate_partials``: the arithmetic of
   ``minmax.py``);
2. a finalize kernel, one program per tensor: reduces that tensor's partials and applies the update of
   ``minmax.py``'s finalize in place (``update_range`` with or without ``ema_update``, and ``seen``),
   per row of the table min/max or moving average.

The result is that of ``minmax.minmax_update_`` on each tensor in turn, bit for bit: min and max are
exact whatever the order, and the update is the same code.

Table (int64 ``(ROWS, W)``, ``W = T + 1`` for ``T`` tensors, row-major; ``mono_quant.group_ops`` builds
it): ``ADDR`` the tensors' addresses (contiguous), ``NUMEL`` their sizes, ``DTYPE`` the dtype codes of
``DTYPE_CODES``, ``RMIN`` / ``RMAX`` / ``SEEN`` the addresses of each observer's float32 ``()``
running min and max and int64 ``(3,)`` ``seen``, ``CONST`` the averaging constant's float32 bits (0 for
min/max), ``EMA`` 1 for a moving average, ``TILE0`` each tensor's first tile (``TILE0[T]``: the tile
count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launcher, accumulate_partials, load_finite, next_power_of_2, partials, update_range

__all__ = ["BLOCK", "DTYPE_CODES", "ROWS", "minmax_update_many_"]

ADDR, NUMEL, DTYPE, RMIN, RMAX, SEEN, CONST, EMA, TILE0 = range(9)
ROWS = 9
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
BLOCK = 4096  # values per tile
BLOCK_P = 1024  # partials per step of the finalize


@triton.jit
def _load_tile(addr, code, offs, mask):
    """Tile ``offs`` of the tensor at ``addr`` (dtype ``code``), as float32, and which lanes are finite."""
    if code == 0:
        x, finite = load_finite(addr.to(tl.pointer_type(tl.float32)), offs, mask)
    elif code == 1:
        x, finite = load_finite(addr.to(tl.pointer_type(tl.bfloat16)), offs, mask)
    elif code == 2:
        x, finite = load_finite(addr.to(tl.pointer_type(tl.float16)), offs, mask)
    else:
        x, finite = load_finite(addr.to(tl.pointer_type(tl.float64)), offs, mask)
    return x, finite


@triton.jit
def _group_partial_kernel(
    table_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    T,
    W,
    BLOCK: tl.constexpr,
    LOG_T: tl.constexpr,
):
    """Partials of one tile.

    table: [in] int64 ``(ROWS, W)`` (module docstring). pmin, pmax: [out] float32 ``(TILE0[T],)``; pbad:
    [out] int64 ``(TILE0[T],)``. Grid: ``(TILE0[T],)``, program ``t`` reads tile ``t``; ``LOG_T``: the
    binary search's steps, ``2**LOG_T >= T``.
    """
    t = tl.program_id(0).to(tl.int64)
    starts = table_ptr + 8 * W  # the TILE0 row
    i = tl.zeros([], tl.int64)  # the largest i with TILE0[i] <= t (TILE0[0] = 0; every tensor has a tile)
    for k in tl.static_range(LOG_T):
        cand = i + (1 << (LOG_T - 1 - k))
        ok = cand < T
        first = tl.load(starts + cand, mask=ok, other=9223372036854775807)
        i = tl.where(ok & (first <= t), cand, i)
    addr = tl.load(table_ptr + i)
    n = tl.load(table_ptr + W + i)
    code = tl.load(table_ptr + 2 * W + i)
    offs = (t - tl.load(starts + i)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x, finite = _load_tile(addr, code, offs, mask)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
    tl.store(pmin_ptr + t, tl.min(mn, 0))
    tl.store(pmax_ptr + t, tl.max(mx, 0))
    tl.store(pbad_ptr + t, tl.sum(bad.to(tl.int64), 0))


@triton.jit
def _group_finalize_kernel(
    table_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    W,
    BLOCK_P: tl.constexpr,
):
    """Reduce tensor ``i``'s partials and update its observer in place. Grid: ``(T,)``.

    table: [in] int64 ``(ROWS, W)``; through it, per tensor: running min / max [in, out] float32 ``()``,
    seen [in, out] int64 ``(3,)``. pmin, pmax: [in] float32; pbad: [in] int64, ``(TILE0[T],)``.
    """
    i = tl.program_id(0).to(tl.int64)
    start = tl.load(table_ptr + 8 * W + i)
    end = tl.load(table_ptr + 8 * W + i + 1)
    mn = tl.full([BLOCK_P], float("inf"), tl.float32)
    mx = tl.full([BLOCK_P], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_P], tl.int64)
    for p0 in range(start, end, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        m = offs < end
        mn = tl.minimum(mn, tl.load(pmin_ptr + offs, mask=m, other=float("inf")))
        mx = tl.maximum(mx, tl.load(pmax_ptr + offs, mask=m, other=float("-inf")))
        bad += tl.load(pbad_ptr + offs, mask=m, other=0)
    mn = tl.min(mn, 0)
    mx = tl.max(mx, 0)
    bad_n = tl.sum(bad, 0)
    n = tl.load(table_ptr + W + i)
    seen_ptr = tl.load(table_ptr + 5 * W + i).to(tl.pointer_type(tl.int64))
    tl.store(seen_ptr, tl.load(seen_ptr) + n - bad_n)
    tl.store(seen_ptr + 1, tl.load(seen_ptr + 1) + bad_n)
    tl.store(seen_ptr + 2, tl.load(seen_ptr + 2) + 1)
    rmin_ptr = tl.load(table_ptr + 3 * W + i).to(tl.pointer_type(tl.float32))
    rmax_ptr = tl.load(table_ptr + 4 * W + i).to(tl.pointer_type(tl.float32))
    c = tl.load(table_ptr + 6 * W + i).to(tl.int32).to(tl.float32, bitcast=True)
    if tl.load(table_ptr + 7 * W + i) != 0:
        update_range(rmin_ptr, rmax_ptr, 0, True, mn, mx, c, True)
    else:
        update_range(rmin_ptr, rmax_ptr, 0, True, mn, mx, c, False)


def minmax_update_many_(table: torch.Tensor, num_tensors: int, num_tiles: int) -> None:
    """Update every observer of ``table`` from its tensor, in two launches.

    Args:
        table: [in] int64 ``(ROWS, num_tensors + 1)`` on the tensors' device (module docstring); the
            tensors and state buffers it points at: [in] and [in, out].
        num_tensors: ``T`` (each tensor non-empty, contiguous, on that device; each observer once).
        num_tiles: ``TILE0[T]``, the tiles of all tensors together.

    Raises:
        ValueError: a table of the wrong shape or dtype.
    """
    if table.dtype != torch.int64 or table.shape != (ROWS, num_tensors + 1) or not table.is_contiguous():
        raise ValueError(f"table must be contiguous int64 ({ROWS}, {num_tensors + 1}), got {table.dtype} "
                         f"{tuple(table.shape)}")  # fmt: skip
    if num_tensors == 0:
        return
    W = num_tensors + 1
    pmin, pmax, pbad, _ = partials(table.device, num_tiles)
    log_t = max(next_power_of_2(num_tensors).bit_length() - 1, 1)
    args = (table, pmin, pmax, pbad, num_tensors, W)
    _PARTIAL((num_tiles,), args, (table, num_tensors, W), BLOCK=BLOCK, LOG_T=log_t)
    _FINALIZE((num_tensors,), (table, pmin, pmax, pbad, W), (table, W), BLOCK_P=BLOCK_P)


# launched without FP fusion (``launch_options``): the moving average rounds as the other kernels' does
_PARTIAL = Launcher(_group_partial_kernel, 8)
_FINALIZE = Launcher(_group_finalize_kernel, 4)
