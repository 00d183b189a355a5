"""Helpers shared by the kernel files: input checks, launch sizes, and the jit helpers for loading.

Launch sizes. On CUDA a reduction runs as a persistent grid of about ``PROGRAMS_PER_SM`` programs per
SM, each looping over tiles with a grid stride (enough loads in flight to fill the memory system, and a
partial result per program that a tiny finalize kernel reduces). Under ``TRITON_INTERPRET=1`` every
program is run in Python one after the other, so few programs with large tiles are used instead.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# 6, not 8: MinMax on an H200 (2026-11-29, three runs, same-run medians) took 1.23 ms at 1e9 fp32 values
# with 6 programs per SM against 1.32-1.33 ms with 8 (bf16: 0.795 against 0.821), and as fast or faster at
# 1e6 and 1e8. At about 80 registers and 256 threads 3 programs fit on an SM at once: 6 (or 3, or 12) make
# whole waves, 8 leaves a partial third one. 6 is also a multiple of the 2 that fit of the ~100-register
# per-channel kernels (those were not timed apart).
PROGRAMS_PER_SM = 6
INTERPRETER_PROGRAMS = 4
# the default load cache modifier of the reductions' jit helpers; a constexpr, since Triton 3.6 passes a
# plain default (a str) through to tl.load, which then fails
DEFAULT_CACHE = tl.constexpr("")


@functools.cache
def _sm_count(index: int) -> int:
    # a host-side property query, cached: no device synchronization
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(x: torch.Tensor, per_sm: int | None = None) -> int:
    """How many programs a persistent reduction over ``x`` should launch at most: ``per_sm`` (default
    ``PROGRAMS_PER_SM``) per SM on CUDA, ``INTERPRETER_PROGRAMS`` under the interpreter."""
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * (per_sm or PROGRAMS_PER_SM)
    return INTERPRETER_PROGRAMS


def resident_programs(n_regs: int, shared_bytes: int, num_warps: int, props) -> int:
    """How many programs of ``num_warps`` warps, ``n_regs`` registers a thread and ``shared_bytes`` of
    shared memory fit on one SM at once (``props``: ``torch.cuda.get_device_properties``; Hopper's limits
    where it lacks a field). Registers are allocated per warp in units of 256; at most 32 programs."""
    threads = num_warps * 32
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    max_threads = getattr(props, "max_threads_per_multi_processor", 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    fits = [max_threads // threads, (regs // per_warp) // num_warps, 32]
    if shared_bytes:
        fits.append(smem // shared_bytes)
    return max(1, min(fits))


def launch_options(num_warps: int) -> dict:
    """Keywords of every kernel launch: ``num_warps``, and no FP fusion.

    Without fusion no ``a * b + c`` becomes an FMA, so float results are those of the torch twins'
    separately rounded ops (with Triton's default, fusion on, the EMA ``run + c * (cur - run)`` differed in
    the last bits on the H200), and they stay so when Triton's default flips (3.9 warns it will in 3.10).
    ``benchmarks/compile_sm90.py`` checks that no kernel's PTX holds an FMA.
    """
    return {"num_warps": num_warps, "enable_fp_fusion": False}


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous float tensor the kernels can read.

    Non-contiguous inputs are copied once (one extra read and write of ``x``, in its own dtype: never an
    fp32 copy); contiguous ones, the usual case for activations and weights, are read in place.

    Raises:
        TypeError: ``x`` is not float16, bfloat16, float32 or float64.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the kernels read float16, bfloat16, float32 or float64 tensors, got {x.dtype}")
    return x if x.is_contiguous() else x.contiguous()


@triton.jit
def load_finite(x_ptr, offs, mask):
    """Load ``x[offs]`` in its own dtype; return it as float32 and which lanes hold a finite value.

    Statistics are those of the float32 values: fp64 beyond the float32 range rounds to +-inf and counts
    as non-finite, as in the torch reference. NaN compares false.
    """
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x, mask & (tl.abs(x) <= 3.4028234663852886e38)


@triton.jit
def accumulate_partials(mn, mx, bad, x, finite, mask):
    """Fold a tile into a program's running finite min, max and non-finite count (tile-shaped)."""
    mn = tl.minimum(mn, tl.where(finite, x, float("inf")))
    mx = tl.maximum(mx, tl.where(finite, x, float("-inf")))
    bad += (mask & ~finite).to(tl.int32)
    return mn, mx, bad


@triton.jit
def store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad):
    """Write a program's partial results: its finite min, max and non-finite count at index ``pid``."""
    tl.store(pmin_ptr + pid, tl.min(mn, 0))
    tl.store(pmax_ptr + pid, tl.max(mx, 0))
    tl.store(pbad_ptr + pid, tl.sum(bad.to(tl.int64), 0))


@triton.jit
def store_channel_partials(
    pmin_ptr, pmax_ptr, pbad_ptr, split, C, cols, cmask, mn, mx, bad, AXIS: tl.constexpr
):
    """Write one split's per-channel partials (row ``split`` of the ``(S, C)`` arrays) for channels ``cols``,
    reducing tile-shaped accumulators over ``AXIS`` (the axis that is not the channels)."""
    out = split.to(tl.int64) * C + cols
    tl.store(pmin_ptr + out, tl.min(mn, AXIS), mask=cmask)
    tl.store(pmax_ptr + out, tl.max(mx, AXIS), mask=cmask)
    tl.store(pbad_ptr + out, tl.sum(bad.to(tl.int64), AXIS), mask=cmask)


@triton.jit
def reduce_partials_and_count(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_partials,
    seen_ptr,
    n,
    BLOCK_P: tl.constexpr,
    CACHE: tl.constexpr = DEFAULT_CACHE,
):
    """The batch's finite min and max from the per-program partials.

    Also adds the batch to ``seen`` (int64 ``(3,)``: finite values, non-finite values, batches). ``CACHE``:
    the partials' load cache modifier (``".cg"``, through L2, where other programs of the same launch
    wrote them).
    """
    offs = tl.arange(0, BLOCK_P)
    m = offs < num_partials
    mn = tl.min(tl.load(pmin_ptr + offs, mask=m, other=float("inf"), cache_modifier=CACHE), 0)
    mx = tl.max(tl.load(pmax_ptr + offs, mask=m, other=float("-inf"), cache_modifier=CACHE), 0)
    bad = tl.sum(tl.load(pbad_ptr + offs, mask=m, other=0, cache_modifier=CACHE), 0)
    tl.store(seen_ptr, tl.load(seen_ptr) + n - bad)
    tl.store(seen_ptr + 1, tl.load(seen_ptr + 1) + bad)
    tl.store(seen_ptr + 2, tl.load(seen_ptr + 2) + 1)
    return mn, mx


@triton.jit
def finalize_channels(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_splits,
    C,
    cb,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    n,
    c,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EMA: tl.constexpr,
    CACHE: tl.constexpr = DEFAULT_CACHE,
):
    """Reduce channel block ``cb``'s ``(S, C)`` partials over the ``S`` splits and update its channels.

    Reads ``[BLOCK_S, BLOCK_C]`` tiles of partials (a split at a time was one dependent round trip to
    memory per split) and adds the block's non-finite count to ``seen`` with integer atomics (order-free,
    so exact); block 0 also adds ``n`` and the batch. ``CACHE`` as in ``reduce_partials_and_count``.
    """
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_S)
    mn = tl.full([BLOCK_S, BLOCK_C], float("inf"), tl.float32)
    mx = tl.full([BLOCK_S, BLOCK_C], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_S, BLOCK_C], tl.int64)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + rows
        offs = (s + tl.zeros([], tl.int64))[:, None] * C + cols[None, :]
        m = (s < num_splits)[:, None] & cmask[None, :]
        mn = tl.minimum(mn, tl.load(pmin_ptr + offs, mask=m, other=float("inf"), cache_modifier=CACHE))
        mx = tl.maximum(mx, tl.load(pmax_ptr + offs, mask=m, other=float("-inf"), cache_modifier=CACHE))
        bad += tl.load(pbad_ptr + offs, mask=m, other=0, cache_modifier=CACHE)
    update_range(rmin_ptr, rmax_ptr, cols, cmask, tl.min(mn, 0), tl.max(mx, 0), c, EMA)
    block_bad = tl.sum(tl.sum(bad, 0), 0)
    tl.atomic_add(seen_ptr, -block_bad)
    tl.atomic_add(seen_ptr + 1, block_bad)
    if cb == 0:
        tl.atomic_add(seen_ptr, tl.zeros([], tl.int64) + n)
        tl.atomic_add(seen_ptr + 2, tl.full([], 1, tl.int64))


@triton.jit
def ema_update(run, cur, c):
    """The range update of ``reference._update_range_`` (float32 ``run``, ``cur``; ``c`` float32): the first
    finite batch sets it, an all-non-finite batch (``cur`` infinite) keeps it, ``c == 1`` takes ``cur``,
    otherwise ``run + c * (cur - run)``, computed again in float64 and rounded once where it overflows."""
    run_inf = tl.abs(run) == float("inf")
    cur_inf = tl.abs(cur) == float("inf")
    # the EMA of the finite cases only (inf - inf would be NaN; it is not selected, but keep it quiet)
    run_f = tl.where(run_inf, 0.0, run)
    cur_f = tl.where(cur_inf, 0.0, cur)
    c = c + tl.zeros([], tl.float32)  # a float32 scalar also under the interpreter (a Python float there)
    ema = run_f + c * (cur_f - run_f)
    run64 = run_f.to(tl.float64)
    ema64 = (run64 + c.to(tl.float64) * (cur_f.to(tl.float64) - run64)).to(tl.float32)
    ema = tl.where(tl.abs(ema) == float("inf"), ema64, ema)
    ema = tl.where(c == 1.0, cur_f, ema)
    return tl.where(run_inf, cur, tl.where(cur_inf, run, ema))


@triton.jit
def update_range(rmin_ptr, rmax_ptr, offs, mask, mn, mx, c, EMA: tl.constexpr):
    """Fold a batch's finite range ``(mn, mx)`` into the running range at ``offs`` (``mask``ed): the min/max
    merge, or with ``EMA`` the moving average of ``ema_update``."""
    run_min = tl.load(rmin_ptr + offs, mask=mask, other=0.0)
    run_max = tl.load(rmax_ptr + offs, mask=mask, other=0.0)
    if EMA:
        tl.store(rmin_ptr + offs, ema_update(run_min, mn, c), mask=mask)
        tl.store(rmax_ptr + offs, ema_update(run_max, mx, c), mask=mask)
    else:
        tl.store(rmin_ptr + offs, tl.minimum(run_min, mn), mask=mask)
        tl.store(rmax_ptr + offs, tl.maximum(run_max, mx), mask=mask)
