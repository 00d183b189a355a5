"""Canonical-grid histogram kernels: binning fused with the min/max, grid decision and coarsening on the
device. Twin of ``mono_quant.reference.histogram_update_``; the grid rule is that of
``mono_quant.core.histogram`` (``canonical_grid``, ``regrid``, ``floor_scaled``, ``bin_index``),
re-derived here because kernels never import mono_quant.

One update is three launches and never reads a value on the host:

1. ``_pass_kernel`` (fused): one read of ``x``. Each persistent program keeps the finite min/max and the
   non-finite count (per-program partials, as in ``minmax.py``) and bins every finite value against the
   grid currently in device memory (``exponent``, ``origin``), adding to a zeroed ``delta`` histogram.
   Values outside the current grid are dropped there: the grid will change and step 3 redoes them.
2. ``_finalize_kernel`` (one program): reduces the partials, merges the running min/max, updates
   ``seen``, computes the canonical grid of the new range by testing all 253 exponents at once, and then
   either (grid unchanged, the steady state) adds ``delta`` to ``counts``, or (grid changed) moves the old
   counts onto the new grid (integer shifts, exact) and raises a flag.
3. ``_pass_kernel`` (re-bin): reads the flag; when it is down every program exits before loading anything
   (a launch and nothing else); when up, it bins all of ``x`` on the new grid straight into ``counts``.

So the steady state reads ``x`` once; a batch that grows the range reads it twice.

Binning strategies (``HIST_STRATEGY``, ``MONO_QUANT_HIST_STRATEGY``), each exact and with the same
result: ``"atomic"`` adds every value with a global integer atomic; ``"tl_histogram"`` accumulates a private histogram per program with
``tl.histogram`` (indices clamped by hand into an extra dump bin: out-of-range behaviour differs across
Triton versions) and adds it once per program. The default follows how ``tl.histogram`` compiles for
sm_90 (PTX read with each version): from Triton 3.8 on it counts in shared memory (``atom.shared``, one
per value, then one global add per bin and program: the technique of ``torch.histc`` on CUDA), so
``"tl_histogram"``; before 3.8 it lowers to warp votes (4096 ``popc`` per tile) and spills about 58 KB per
thread, so ``"atomic"``. Measured on an H200 with Triton 3.6 (2026-11-29, 1e9 fp32 values, 2048 bins):
``"atomic"`` 70 ms, ``"tl_histogram"`` 1055 ms; the 3.8 lowering is not timed yet (that machine has 3.6).
The 70 ms were Triton's default acquire-release atomics (about 14 G atomics/s); the pass's atomics are
now relaxed (no fence; nothing reads the counts before the launch ends, and integer adds commute; 3.9
emits them as ``red``), not timed yet either. ``"warp_atomic"`` (opt-in, not timed yet) first groups
the lanes of each warp by bin (``match.any.sync``, inline PTX) and lets one lane per group add the group's
size: for concentrated data, where most values fall in a few bins, up to 32x fewer atomics. Inline PTX
does not run in the interpreter, so only the ``gpu`` tests check it (exactly, against the torch path).
``"mma"`` (opt-in, not timed yet) counts on the tensor cores and needs no shared-memory atomics, so it
also runs fast where ``tl.histogram`` does not (Triton before 3.8): bin ``b`` is the cell
``(b // LO, b % LO)`` of an int32 ``[HI, LO]`` accumulator per program, and each tile of 128 values adds
the matmul of its two one-hot matrices, ``[HI, 128] @ [128, LO]`` in int8 (exact). That is ``HI + LO``
compares and ``HI * LO`` multiply-adds per value instead of an atomic, and the same cost on any data
(the 4098 bins held for 2048 user bins: 64 x 64). Bins above the largest power of two held (the last 2 of
4098), and above 8192, are added by atomics.
Counts are int64 everywhere but the per-program int32 accumulators (a program never holds 2**31 values).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (
    accumulate_partials,
    launch_options,
    load_finite,
    max_programs,
    prepare_input,
    reduce_partials_and_count,
    store_partials,
)

__all__ = ["HIST_STRATEGIES", "histogram_update_"]

BLOCK = 4096
E_MIN, E_MAX = -126, 126
HIST_STRATEGIES = ("atomic", "tl_histogram", "warp_atomic", "mma")
# strategies the interpreter can run (``"warp_atomic"`` is inline PTX: compiled CUDA only)
INTERPRETABLE_STRATEGIES = ("atomic", "tl_histogram", "mma")
MMA_BLOCK = 128  # values per tile (the matmul's K) of the "mma" binning
# bins the "mma" binning counts on the tensor cores (an int32 [64, 128] accumulator); the rest by atomics
MMA_MAX_BINS = 8192


def _mma_shape(num_bins: int) -> tuple[int, int]:
    """``(HI, LO)`` of the ``"mma"`` accumulator: the largest power of two of bins up to ``num_bins``
    (at least 256: ``tl.dot`` needs 16 rows and columns, at most ``MMA_MAX_BINS``), 64 rows where it can."""
    nbd = min(max(1 << (num_bins.bit_length() - 1), 256), MMA_MAX_BINS)
    hi = min(64, nbd // 16)
    return hi, nbd // hi


def _default_strategy() -> str:
    env = os.environ.get("MONO_QUANT_HIST_STRATEGY", "").strip().lower()
    if env:
        if env not in HIST_STRATEGIES:
            raise ValueError(f"MONO_QUANT_HIST_STRATEGY={env!r} is not one of {', '.join(HIST_STRATEGIES)}")
        return env
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return "tl_histogram" if (major, minor) >= (3, 8) else "atomic"  # see the docstring


HIST_STRATEGY = _default_strategy()


@triton.jit
def _inv_width(e):
    """``2**-e`` as float32, built from its bits (exact; ``e`` in ``[-126, 126]`` gives a normal float)."""
    bits = ((127 - e).to(tl.int32)) << 23
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _floor_scaled(x, inv_w):
    """``floor(x * inv_w)``; negatives pinned to ``<= -1`` (a tiny negative can underflow to -0.0)."""
    q = tl.floor(x * inv_w)
    return tl.where(x < 0, tl.minimum(q, -1.0), q)


@triton.jit
def _bin(x, finite, inv_w, origin, num_bins):
    """Bin index (int64) of each float32 value and whether it is finite and inside the grid."""
    q = _floor_scaled(x, inv_w)
    # keep the float -> int conversion defined for values far outside the grid (and non-finite lanes)
    q = tl.minimum(tl.maximum(q, -1.0e12), 1.0e12)
    q = tl.where(finite, q, -1.0e12)
    idx = q.to(tl.int64) - origin
    inside = finite & (idx >= 0) & (idx < num_bins)
    return idx, inside


@triton.jit
def _warp_leader_counts(idx):
    """Per lane: how many lanes of its warp hold the same ``idx`` (int32) if it is the lowest of them, else 0.

    ``match.any.sync`` groups the 32 lanes by value, one register (tensor element) at a time; the group's
    lowest lane gets ``popc`` of the group. Every lane must run it (Triton code has no divergence here).
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 wa_group, wa_lower, wa_count;
        .reg .pred wa_leader;
        match.any.sync.b32 wa_group, $1, 0xffffffff;
        mov.u32 wa_lower, %lanemask_lt;
        and.b32 wa_lower, wa_lower, wa_group;
        setp.eq.u32 wa_leader, wa_lower, 0;
        popc.b32 wa_count, wa_group;
        selp.b32 $0, wa_count, 0, wa_leader;
        }""",
        constraints="=r,r",
        args=[idx],
        dtype=tl.int32,
        is_pure=False,  # a warp collective: never moved or merged
        pack=1,
    )


@triton.jit
def _onehot_dot(idx, inside, acc, HI: tl.constexpr, LO: tl.constexpr):
    """Add a tile's bins below ``HI * LO`` to ``acc`` (int32 ``[HI, LO]``, bin ``r * LO + c`` at ``[r, c]``).

    ``acc[r, c] += sum_k [idx_k // LO == r] * [idx_k % LO == c]``: one int8 matmul of two one-hot
    matrices, ``[HI, K] @ [K, LO]``, exact in int32. Binning costs ``HI + LO`` compares and ``HI * LO``
    tensor-core multiply-adds per value, and no atomic; values outside, or at bins ``>= HI * LO``, get a
    row that matches nothing.
    """
    i = tl.where(inside, idx, -1).to(tl.int32)
    row = tl.where((i >= 0) & (i < HI * LO), i // LO, HI)
    a = (tl.arange(0, HI)[:, None] == row[None, :]).to(tl.int8)
    b = ((i % LO)[:, None] == tl.arange(0, LO)[None, :]).to(tl.int8)
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit
def _pass_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    hist_ptr,
    exp_ptr,
    org_ptr,
    flag_ptr,
    n,
    num_tiles,
    num_bins,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
    FUSED: tl.constexpr,
    STRATEGY: tl.constexpr,
    HI: tl.constexpr,
    LO: tl.constexpr,
):
    """Bin ``x`` on the grid in device memory; fused with the min/max partials, or gated by a flag.

    x: ``(n,)`` contiguous. pmin, pmax: float32 ``(P,)``; pbad: int64 ``(P,)`` (written when ``FUSED``).
    hist: int64 ``(num_bins,)``, added to. exp, org: int64 ``()``, the grid. flag: int32 ``(1,)``, read when
    not ``FUSED``: 0 means nothing to do. ``NB``: a power of two above ``num_bins`` (the last bins are the
    dump for values outside). ``STRATEGY``: one of ``HIST_STRATEGIES``; ``HI``, ``LO``: the shape of the
    ``"mma"`` accumulator (bins ``[0, HI * LO)`` on the tensor cores, the rest by atomics; 1 otherwise).
    Grid: ``(P,)``, tiles ``p, p + P, ...`` of ``BLOCK`` elements.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    tiles = num_tiles
    if not FUSED:
        tiles = tl.where(tl.load(flag_ptr) != 0, num_tiles, 0)
    origin = tl.load(org_ptr)
    inv_w = _inv_width(tl.load(exp_ptr))
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    local = tl.zeros([NB], tl.int32)
    acc = tl.zeros([HI, LO], tl.int32)
    for t in range(pid, tiles, nprog):
        offs = (t + tl.zeros([], tl.int64)) * BLOCK + lane
        mask = offs < n
        x, finite = load_finite(x_ptr, offs, mask)
        if FUSED:
            mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
        idx, inside = _bin(x, finite, inv_w, origin, num_bins)
        if STRATEGY == "tl_histogram":
            local += tl.histogram(tl.where(inside, idx, NB - 1).to(tl.int32), NB)
        elif STRATEGY == "mma":
            acc = _onehot_dot(idx, inside, acc, HI, LO)
            one = tl.full([BLOCK], 1, tl.int64)
            tl.atomic_add(hist_ptr + idx, one, mask=inside & (idx >= HI * LO), sem="relaxed")
        elif STRATEGY == "warp_atomic":
            # one atomic per distinct bin per warp and register: concentrated data (most values in a few
            # bins, as LLM activations with outliers give) needs up to 32x fewer
            cnt = _warp_leader_counts(tl.where(inside, idx, -1).to(tl.int32))
            tl.atomic_add(hist_ptr + idx, cnt.to(tl.int64), mask=inside & (cnt > 0), sem="relaxed")
        else:
            tl.atomic_add(hist_ptr + idx, tl.full([BLOCK], 1, tl.int64), mask=inside, sem="relaxed")
    if STRATEGY == "tl_histogram":
        b = tl.arange(0, NB)
        tl.atomic_add(hist_ptr + b, local.to(tl.int64), mask=(b < num_bins) & (local > 0), sem="relaxed")
    if STRATEGY == "mma":
        b = tl.arange(0, HI)[:, None] * LO + tl.arange(0, LO)[None, :]
        tl.atomic_add(hist_ptr + b, acc.to(tl.int64), mask=(b < num_bins) & (acc > 0), sem="relaxed")
    if FUSED:
        store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad)


@triton.jit
def _finalize_kernel(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_partials,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    exp_ptr,
    org_ptr,
    counts_ptr,
    delta_ptr,
    flag_ptr,
    n,
    num_bins,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    E_LO: tl.constexpr,
    E_HI: tl.constexpr,
):
    """Reduce the partials, update range and ``seen``, choose the grid, move or add the counts. Grid: (1,).

    rmin, rmax: float32 ``()``; seen: int64 ``(3,)``; exp, org: int64 ``()``; counts, delta: int64
    ``(num_bins,)`` (delta is reused as scratch when the grid changes); flag: int32 ``(1,)``, written.
    """
    mn, mx = reduce_partials_and_count(pmin_ptr, pmax_ptr, pbad_ptr, num_partials, seen_ptr, n, BLOCK_P)
    mn = tl.minimum(tl.load(rmin_ptr), mn)
    mx = tl.maximum(tl.load(rmax_ptr), mx)
    tl.store(rmin_ptr, mn)
    tl.store(rmax_ptr, mx)

    # canonical_grid: the smallest e whose bins hold [mn, mx], not below the float32 spacing at max |x|
    empty = ~(mn <= mx)
    mn_s = tl.where(empty, 0.0, mn)
    mx_s = tl.where(empty, 0.0, mx)
    exps = E_LO + tl.arange(0, 256)
    valid = exps <= E_HI
    inv = _inv_width(tl.minimum(exps, E_HI))
    span = _floor_scaled(mx_s, inv) - _floor_scaled(mn_s, inv)
    mag = tl.maximum(tl.abs(mn_s), tl.abs(mx_s))
    biased = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
    # frexp: 0 -> exponent 0 (floor -24); subnormals are below 2**-126 (floor clamps to E_LO)
    e_floor = tl.where(mag == 0.0, -24, tl.where(biased == 0, E_LO, biased - 150))
    e_floor = tl.minimum(tl.maximum(e_floor, E_LO), E_HI)
    ok = valid & (span < num_bins) & (exps >= e_floor)
    new_e = tl.min(tl.where(ok, exps, E_HI), 0)
    new_e = tl.where(empty, E_LO, new_e).to(tl.int64)
    new_o = tl.where(empty, 0, _floor_scaled(mn_s, _inv_width(new_e)).to(tl.int64))

    old_e = tl.load(exp_ptr)
    old_o = tl.load(org_ptr)
    changed = (new_e != old_e) | (new_o != old_o)
    tl.store(flag_ptr, changed.to(tl.int32))
    if changed:
        # regrid: old bin j -> ((old_o + j) >> k) - new_o; stage the old counts in delta, then scatter
        shift = tl.minimum(tl.maximum(new_e - old_e, 0), 62)
        for j0 in range(0, num_bins, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            jm = j < num_bins
            tl.store(delta_ptr + j, tl.load(counts_ptr + j, mask=jm, other=0), mask=jm)
            tl.store(counts_ptr + j, tl.zeros([BLOCK_B], tl.int64), mask=jm)
        tl.debug_barrier()
        for j0 in range(0, num_bins, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            jm = j < num_bins
            cnt = tl.load(delta_ptr + j, mask=jm, other=0)
            dest = ((old_o + j) >> shift) - new_o
            dest = tl.minimum(tl.maximum(dest, 0), num_bins - 1)
            tl.atomic_add(counts_ptr + dest, cnt, mask=jm & (cnt != 0))
        tl.store(exp_ptr, new_e)
        tl.store(org_ptr, new_o)
    else:
        for j0 in range(0, num_bins, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            jm = j < num_bins
            add = tl.load(delta_ptr + j, mask=jm, other=0)
            tl.store(counts_ptr + j, tl.load(counts_ptr + j, mask=jm, other=0) + add, mask=jm)


def _check_state(running_min, running_max, seen, exponent, origin, counts) -> None:
    for name, t, dtype, shape in (
        ("running_min", running_min, torch.float32, ()),
        ("running_max", running_max, torch.float32, ()),
        ("seen", seen, torch.int64, (3,)),
        ("exponent", exponent, torch.int64, ()),
        ("origin", origin, torch.int64, ()),
    ):
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if counts.dtype != torch.int64 or counts.dim() != 1 or not counts.is_contiguous():
        raise ValueError(
            f"counts must be a contiguous 1-D int64 tensor, got {counts.dtype} {tuple(counts.shape)}"
        )


def histogram_update_(
    x: torch.Tensor,
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    seen: torch.Tensor,
    exponent: torch.Tensor,
    origin: torch.Tensor,
    counts: torch.Tensor,
    strategy: str | None = None,
) -> None:
    """Add the finite values of ``x`` to a canonical-grid histogram, in place (see the reference twin).

    Args:
        x: non-empty float tensor. running_min, running_max: float32 ``()``. seen: int64 ``(3,)``.
        exponent, origin: int64 ``()``. counts: int64 ``(B,)``.
        strategy: one of ``HIST_STRATEGIES`` (default ``HIST_STRATEGY``); same result with each.
            ``"warp_atomic"`` runs compiled on CUDA only (inline PTX), not in the interpreter.

    Raises:
        TypeError: unsupported dtype. ValueError: bad state buffers or strategy.
    """
    strategy = strategy or HIST_STRATEGY
    if strategy not in HIST_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {HIST_STRATEGIES}")
    if strategy not in INTERPRETABLE_STRATEGIES and not x.is_cuda:
        raise ValueError(
            f"strategy={strategy!r} is inline PTX: CUDA tensors only, not Triton's interpreter; "
            f"use one of {INTERPRETABLE_STRATEGIES}"
        )
    _check_state(running_min, running_max, seen, exponent, origin, counts)
    x = prepare_input(x)
    n = x.numel()
    num_bins = counts.shape[0]
    block, warps, hi, lo = (MMA_BLOCK, 4, *_mma_shape(num_bins)) if strategy == "mma" else (BLOCK, 8, 1, 1)
    num_tiles = triton.cdiv(n, block)
    programs = min(num_tiles, max_programs(x))
    pmin = torch.empty(2 * programs, dtype=torch.float32, device=x.device)
    pbad = torch.empty(programs + 1, dtype=torch.int64, device=x.device)
    flag = pbad[programs:].view(torch.int32)  # 2 int32 words; the first is the flag
    delta = torch.zeros(num_bins, dtype=torch.int64, device=x.device)
    meta = dict(
        BLOCK=block,
        NB=triton.next_power_of_2(num_bins + 1),
        STRATEGY=strategy,
        HI=hi,
        LO=lo,
        **launch_options(warps),
    )
    grid = (programs,)
    pmax = pmin[programs:]
    _pass_kernel[grid](
        x, pmin, pmax, pbad, delta, exponent, origin, flag, n, num_tiles, num_bins, FUSED=True, **meta
    )
    _finalize_kernel[(1,)](
        pmin, pmax, pbad, programs, running_min, running_max, seen, exponent, origin, counts, delta, flag,
        n, num_bins, BLOCK_P=max(triton.next_power_of_2(programs), 16), BLOCK_B=1024, E_LO=E_MIN, E_HI=E_MAX,
        **launch_options(4),
    )  # fmt: skip
    _pass_kernel[grid](
        x, pmin, pmax, pbad, counts, exponent, origin, flag, n, num_tiles, num_bins, FUSED=False, **meta
    )
