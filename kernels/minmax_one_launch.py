"""One-launch min/max kernels (opt-in, ``MONO_QUANT_MINMAX_KERNEL=one_launch``): the same contract and the
same bits as ``minmax.py``'s two-launch kernels, in one launch per update and with a lighter hot loop.

Per tensor, each persistent program (grid ``(P,)``):

1. reads its full super-tiles (``UNROLL`` unmasked tiles of ``BLOCK`` values each, grid-strided: ``p, p + P,
   ...``, ``evict_first``) keeping only a NaN-propagating min and max (``PropagateNan.ALL``: defined
   the same on the GPU and in the interpreter). No per-value finite filtering and no count: a tile of
   finite values needs neither;
2. if that min or max came out NaN or infinite, the program saw a non-finite value somewhere: it reads
   its own super-tiles again on the exact path (``load_finite`` + ``accumulate_partials``, the
   two-launch kernel's arithmetic), which gives the finite min/max and the non-finite count. The ragged
   tail (fewer than ``BLOCK * UNROLL`` values) always takes the exact path, in the program that owns it in
   the grid stride. So min, max and counts never depend on how min/max treat NaN;
3. writes its partials (min, max, non-finite count at index ``p``) and takes a ticket
   (``atomic_add``, acquire-release at GPU scope, after a barrier so that every thread's stores are
   ordered before it). The program that draws ticket ``P - 1`` is the last: it reduces the partials
   (loads through L2, ``.cg``), applies the update (min/max merge or EMA, ``seen``) and resets the ticket
   to 0 for the next launch. Deterministic (the reduction is the same whichever program is last), no
   float atomics, no host read, and the ticket is zero again whenever a launch has finished, so a CUDA
   graph replays it as often as it likes.

Per channel, the same three steps per split: grid ``(channel blocks, S)``; the ticket is per channel block
(``(channel blocks,)`` int32), and the last of its ``S`` programs reduces that block's ``(S, BLOCK_C)``
partials (``finalize_channels``, shared with the two-launch finalize). ``[R, C]`` views (channel axis
last) read ``[BLOCK_R, BLOCK_C]`` tiles, full row tiles unmasked when ``C % BLOCK_C == 0``; ``[O, C, I]``
views read ``[BLOCK_C, BLOCK_I]`` tiles, ``BLOCK_I`` dividing ``I`` where a power of two of at least 32
does (else the tiles are masked and take the exact path).

Scratch: ``pmin``, ``pmax`` float32 and ``pbad`` int64 partials (written before read, no zeroing) and the
tickets, which must be 0 before the first launch (the launchers allocate them zeroed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Launcher,
    accumulate_partials,
    cdiv,
    finalize_channels,
    load_finite,
    max_programs,
    next_power_of_2,
    partials,
    reduce_partials_and_count,
    resident_programs,
    store_channel_partials,
    store_partials,
    update_range,
)

__all__ = ["minmax_per_channel_update_", "minmax_update_"]

# Per tensor: a tile is one 16-byte load a thread (fp32: 1024 values, bf16: 2048), UNROLL tiles a
# super-tile: 128 bytes of loads in flight a thread, 32 KB a program of NUM_WARPS warps.
VECTOR_BYTES = 16
NUM_WARPS = 8
UNROLL = 8
# Programs per SM: as many as fit at once (``resident_programs`` of the compiled kernel's registers), known
# after a specialization's first launch; that first launch takes PROGRAMS_PER_SM. Any count gives the same
# result (the reduction is exact); whole waves of resident programs keep the persistent loops balanced.
PROGRAMS_PER_SM = 4
_resident: dict[tuple, int] = {}  # (kernel, dtype, device index) -> programs per SM
TILE = 2048  # elements per [BLOCK_R, BLOCK_C] or [BLOCK_C, BLOCK_I] per-channel tile
ROW_UNROLL = 4  # row tiles per super-tile of the [R, C] kernel (4 loads in flight a thread)
FINALIZE_SPLITS = 4  # splits per step of the last program's reduction (16 took twice the registers)


@triton.jit
def _flagged(mn, mx):
    """Whether a NaN-propagating min/max saw a non-finite value (NaN, or a +-inf that is not the fill)."""
    bad = (mn != mn) | (mx != mx) | (mn == float("-inf")) | (mx == float("inf"))
    return tl.max(bad.to(tl.int32)) > 0


@triton.jit
def _super_tiles_exact(x_ptr, start, stop, step, n, mn, mx, bad, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Fold super-tiles ``start, start + step, ... < stop`` of ``x`` into the finite accumulators (masked
    by ``n``: also the ragged tail)."""
    lane = tl.arange(0, BLOCK)
    for t in range(start, stop, step):
        base = (t + tl.zeros([], tl.int64)) * (BLOCK * UNROLL)
        for u in range(UNROLL):  # not unrolled: the rare path keeps few registers
            offs = base + u * BLOCK + lane
            mask = offs < n
            x, finite = load_finite(x_ptr, offs, mask)
            mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
    return mn, mx, bad


@triton.jit
def _one_launch_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    ticket_ptr,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    n,
    c,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    EMA: tl.constexpr,
):
    """Finite min/max, non-finite count and the update of one tensor, in one launch (module docstring).

    x: ``(n,)`` contiguous, fp32/bf16/fp16/fp64. pmin, pmax: [out] float32 ``(P,)``; pbad: [out] int64
    ``(P,)``; ticket: [in, out] int32 ``()``, 0 before and after. rmin, rmax: [in, out] float32 ``()``;
    seen: [in, out] int64 ``(4,)``. ``c``: the averaging constant (used when ``EMA``). Grid: ``(P,)``,
    ``P <= BLOCK_P``.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    num_full = n // (BLOCK * UNROLL)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for t in range(pid, num_full, nprog):  # the hot loop: unmasked loads, two min/max a value
        base = (t + tl.zeros([], tl.int64)) * (BLOCK * UNROLL)
        for u in tl.static_range(UNROLL):
            x = tl.load(x_ptr + base + u * BLOCK + lane, eviction_policy="evict_first").to(tl.float32)
            mn = tl.minimum(mn, x, propagate_nan=tl.PropagateNan.ALL)
            mx = tl.maximum(mx, x, propagate_nan=tl.PropagateNan.ALL)
    bad = tl.zeros([BLOCK], tl.int32)
    if _flagged(mn, mx):  # a non-finite value in this program's tiles: read them again, exactly
        mn = tl.full([BLOCK], float("inf"), tl.float32)
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        mn, mx, bad = _super_tiles_exact(x_ptr, pid, num_full, nprog, n, mn, mx, bad, BLOCK, UNROLL)
    if pid == num_full % nprog:  # the ragged tail, if any
        mn, mx, bad = _super_tiles_exact(
            x_ptr, num_full, tl.cdiv(n, BLOCK * UNROLL), 1, n, mn, mx, bad, BLOCK, UNROLL
        )
    store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad)
    tl.debug_barrier()  # every thread's stores before the ticket
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        lo, hi = reduce_partials_and_count(
            pmin_ptr, pmax_ptr, pbad_ptr, nprog, seen_ptr, n, tl.zeros([], tl.int64), BLOCK_P, ".cg"
        )
        update_range(rmin_ptr, rmax_ptr, 0, True, lo, hi, c, EMA)
        tl.store(ticket_ptr, 0)


@triton.jit
def _rows_one_launch_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    tickets_ptr,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    R,
    C,
    n,
    c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    EVEN_C: tl.constexpr,
    EMA: tl.constexpr,
):
    """Per-channel update of ``x`` viewed as ``[R, C]`` (channel axis last, contiguous), in one launch.

    pmin, pmax: [out] float32 ``(S, C)``; pbad: [out] int64 ``(S, C)``; tickets: [in, out] int32
    ``(cdiv(C, BLOCK_C),)``, 0 before and after. rmin, rmax: [in, out] float32 ``(C,)``; seen: [in, out]
    int64 ``(4,)``. Grid: ``(cdiv(C, BLOCK_C), S)``; program ``(cb, s)`` reads super-tiles of ``UNROLL``
    row tiles ``s, s + S, ...`` of channel block ``cb``. ``EVEN_C``: ``C % BLOCK_C == 0`` (no column mask).
    """
    cb = tl.program_id(0)
    s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows0 = tl.arange(0, BLOCK_R)
    num_full = R // (BLOCK_R * UNROLL)  # full super-tiles of UNROLL row tiles
    mn = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    mx = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    for t in range(s, num_full, num_splits):
        base = (t + tl.zeros([], tl.int64)) * (BLOCK_R * UNROLL)
        for u in tl.static_range(UNROLL):
            offs = (base + u * BLOCK_R + rows0)[:, None] * C + cols[None, :]
            if EVEN_C:
                x = tl.load(x_ptr + offs, eviction_policy="evict_first")
            else:  # masked columns belong to no channel: whatever they hold is never stored
                x = tl.load(x_ptr + offs, mask=cmask[None, :], other=0.0, eviction_policy="evict_first")
            x = x.to(tl.float32)
            mn = tl.minimum(mn, x, propagate_nan=tl.PropagateNan.ALL)
            mx = tl.maximum(mx, x, propagate_nan=tl.PropagateNan.ALL)
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    if _flagged(tl.where(cmask[None, :], mn, 0.0), tl.where(cmask[None, :], mx, 0.0)):
        mn = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
        mx = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        for t in range(s, num_full, num_splits):
            for u in range(UNROLL):
                mn, mx, bad = _row_tile_exact(
                    x_ptr, t * UNROLL + u, R, C, cols, cmask, rows0, mn, mx, bad, BLOCK_R
                )
    if s == num_full % num_splits:  # the ragged last row tiles, if any
        for t in range(num_full * UNROLL, tl.cdiv(R, BLOCK_R)):
            mn, mx, bad = _row_tile_exact(x_ptr, t, R, C, cols, cmask, rows0, mn, mx, bad, BLOCK_R)
    store_channel_partials(pmin_ptr, pmax_ptr, pbad_ptr, s, C, cols, cmask, mn, mx, bad, 0)
    tl.debug_barrier()
    if tl.atomic_add(tickets_ptr + cb, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        finalize_channels(
            pmin_ptr, pmax_ptr, pbad_ptr, num_splits, C, cb, rmin_ptr, rmax_ptr, seen_ptr, n, c,
            seen_ptr, 1, 1, BLOCK_S, BLOCK_C, EMA, False, ".cg",
        )  # fmt: skip
        tl.store(tickets_ptr + cb, 0)


@triton.jit
def _row_tile_exact(x_ptr, t, R, C, cols, cmask, rows0, mn, mx, bad, BLOCK_R: tl.constexpr):
    """Fold row tile ``t`` of ``[R, C]`` into the finite per-lane accumulators (masked)."""
    rows = (t + tl.zeros([], tl.int64)) * BLOCK_R + rows0
    mask = (rows < R)[:, None] & cmask[None, :]
    x, finite = load_finite(x_ptr, rows[:, None] * C + cols[None, :], mask)
    return accumulate_partials(mn, mx, bad, x, finite, mask)


@triton.jit
def _inner_one_launch_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    tickets_ptr,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    C,
    INNER,
    tiles_per_row,
    num_tiles,
    n,
    c,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_S: tl.constexpr,
    EVEN: tl.constexpr,
    EMA: tl.constexpr,
):
    """Per-channel update of ``x`` viewed as ``[O, C, I]`` with ``I > 1`` (contiguous), in one launch.

    Buffers as ``_rows_one_launch_kernel``'s. Grid: ``(cdiv(C, BLOCK_C), S)``; program ``(cb, s)`` reads
    tiles ``s, s + S, ...`` of channel block ``cb``; tile ``t = o * tiles_per_row + j`` holds
    ``x[o, cb * BLOCK_C : (cb + 1) * BLOCK_C, j * BLOCK_I : (j + 1) * BLOCK_I]``. ``EVEN``: ``BLOCK_I``
    divides ``I`` and ``BLOCK_C`` divides ``C`` (unmasked tiles); otherwise every tile takes the exact path.
    """
    cb = tl.program_id(0)
    s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    lane = tl.arange(0, BLOCK_I)
    mn = tl.full([BLOCK_C, BLOCK_I], float("inf"), tl.float32)
    mx = tl.full([BLOCK_C, BLOCK_I], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_C, BLOCK_I], tl.int32)
    if EVEN:
        for t in range(s, num_tiles, num_splits):
            o = t // tiles_per_row + tl.zeros([], tl.int64)  # int64: the offsets pass 2**31
            i = (t - o * tiles_per_row) * BLOCK_I + lane
            x = tl.load(x_ptr + (o * C + cols[:, None]) * INNER + i[None, :], eviction_policy="evict_first")
            x = x.to(tl.float32)
            mn = tl.minimum(mn, x, propagate_nan=tl.PropagateNan.ALL)
            mx = tl.maximum(mx, x, propagate_nan=tl.PropagateNan.ALL)
        exact = _flagged(mn, mx)
    else:
        exact = True
    if exact:
        mn = tl.full([BLOCK_C, BLOCK_I], float("inf"), tl.float32)
        mx = tl.full([BLOCK_C, BLOCK_I], float("-inf"), tl.float32)
        for t in range(s, num_tiles, num_splits):
            o = t // tiles_per_row + tl.zeros([], tl.int64)
            i = (t - o * tiles_per_row) * BLOCK_I + lane
            mask = cmask[:, None] & (i < INNER)[None, :]
            x, finite = load_finite(x_ptr, (o * C + cols[:, None]) * INNER + i[None, :], mask)
            mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
    store_channel_partials(pmin_ptr, pmax_ptr, pbad_ptr, s, C, cols, cmask, mn, mx, bad, 1)
    tl.debug_barrier()
    if tl.atomic_add(tickets_ptr + cb, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        finalize_channels(
            pmin_ptr, pmax_ptr, pbad_ptr, num_splits, C, cb, rmin_ptr, rmax_ptr, seen_ptr, n, c,
            seen_ptr, 1, 1, BLOCK_S, BLOCK_C, EMA, False, ".cg",
        )  # fmt: skip
        tl.store(tickets_ptr + cb, 0)


def block_for(element_size: int) -> int:
    """Values per tile of the per-tensor kernel: one 16-byte load a thread (fp32: 1024, bf16: 2048)."""
    return NUM_WARPS * 32 * VECTOR_BYTES // element_size


def programs_per_sm(kernel, x: torch.Tensor) -> int:
    """Programs per SM for ``kernel`` on ``x``: the measured residency once a launch has compiled it."""
    return _resident.get((kernel, x.dtype, x.device.index), PROGRAMS_PER_SM)


def _remember(kernel, x: torch.Tensor, compiled) -> None:
    """Record the residency of a compiled kernel (nothing under the interpreter, which returns none)."""
    key = (kernel, x.dtype, x.device.index)
    if key not in _resident and getattr(compiled, "n_regs", 0):
        props = torch.cuda.get_device_properties(x.device)
        shared = getattr(getattr(compiled, "metadata", None), "shared", 0) or 0
        _resident[key] = resident_programs(compiled.n_regs, shared, NUM_WARPS, props)


_PER_TENSOR = Launcher(_one_launch_kernel, NUM_WARPS)
_ROWS = Launcher(_rows_one_launch_kernel, NUM_WARPS)
_INNER = Launcher(_inner_one_launch_kernel, NUM_WARPS)


def minmax_update_(x: torch.Tensor, state, c: float | None) -> None:
    """The per-tensor update of ``minmax.minmax_update_`` on a checked, contiguous, non-empty ``x``."""
    n = x.numel()
    block = block_for(x.element_size())
    budget = max_programs(x, programs_per_sm(_one_launch_kernel, x))
    programs = max(1, min(budget, cdiv(n, block * UNROLL)))
    pmin, pmax, pbad, ticket = partials(x.device, programs, None, 1)
    args = (x, pmin, pmax, pbad, ticket, state.running_min, state.running_max, state.seen, n,
            0.0 if c is None else float(c))  # fmt: skip
    compiled = _PER_TENSOR(
        (programs,), args, (x, *state, n), BLOCK=block, UNROLL=UNROLL,
        BLOCK_P=max(next_power_of_2(programs), 16), EMA=c is not None,
    )  # fmt: skip
    _remember(_one_launch_kernel, x, compiled)


def _largest_pow2_divisor(v: int, cap: int) -> int:
    return min(v & -v, cap)


def minmax_per_channel_update_(
    x: torch.Tensor, outer: int, channels: int, inner: int, state, c: float | None
) -> None:
    """The per-channel update of ``minmax.minmax_per_channel_update_`` on a checked, contiguous ``x``
    viewed as ``[outer, channels, inner]``."""
    kernel = _rows_one_launch_kernel if inner == 1 else _inner_one_launch_kernel
    budget = max_programs(x, programs_per_sm(kernel, x))
    if inner == 1:
        block_c = min(next_power_of_2(channels), 128 if x.is_cuda else 1024)
        block_r = max(TILE // block_c, 1)
        channel_blocks = cdiv(channels, block_c)
        splits = max(1, min(cdiv(outer, block_r * ROW_UNROLL), budget // channel_blocks, 65535))
    else:
        block_i = _largest_pow2_divisor(inner, TILE)
        even = block_i >= 32
        if not even:
            block_i = min(next_power_of_2(inner), TILE)
        block_c = min(max(TILE // block_i, 1), next_power_of_2(channels))
        even = even and channels % block_c == 0
        channel_blocks = cdiv(channels, block_c)
        tiles_per_row = cdiv(inner, block_i)
        num_tiles = outer * tiles_per_row
        splits = max(1, min(num_tiles, cdiv(budget, channel_blocks), 65535))
    pmin, pmax, pbad, tickets = partials(x.device, splits, channels, channel_blocks)
    common = (pmin, pmax, pbad, tickets, *state)
    grid = (channel_blocks, splits)
    block_s = min(next_power_of_2(splits), FINALIZE_SPLITS)
    ema, cf = c is not None, 0.0 if c is None else float(c)
    if inner == 1:
        args = (x, *common, outer, channels, x.numel(), cf)
        compiled = _ROWS(
            grid, args, (x, *state, outer, channels, x.numel()), BLOCK_R=block_r, BLOCK_C=block_c,
            UNROLL=ROW_UNROLL, BLOCK_S=block_s, EVEN_C=channels % block_c == 0, EMA=ema,
        )  # fmt: skip
    else:
        args = (x, *common, channels, inner, tiles_per_row, num_tiles, x.numel(), cf)
        compiled = _INNER(
            grid, args, (x, *state, *args[8:13]), BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_S=block_s,
            EVEN=even, EMA=ema,
        )  # fmt: skip
    _remember(kernel, x, compiled)
