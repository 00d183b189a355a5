"""Canonical-grid histogram kernels: min/max, grid decision and coarsening on the device, and binning.
Twin of ``mono_quant.reference.histogram_update_``; the grid rule is that of ``mono_quant.grid``
(``canonical_grid``, ``regrid``, ``floor_scaled``, ``bin_index``), re-derived here because kernels never
import mono_quant. An update never reads a value on the host:

1. ``_pass_kernel`` (fused): one read of ``x``. Each persistent program keeps the finite min/max and the
   non-finite count (per-program partials, as in ``minmax.py``) and bins every finite value against the
   grid currently in device memory (``exponent``, ``origin``) into a zeroed ``delta`` histogram. Values
   outside the current grid are dropped there: the grid will change and step 3 redoes them. With the
   ``"histc"`` binning this step is ``minmax.py``'s partial kernel alone.
2. ``_finalize_kernel`` (one program): reduces the partials, merges the running min/max, updates
   ``seen``, computes the canonical grid of the new range by testing all 253 exponents at once, and then
   either (grid unchanged) adds ``delta`` to ``counts``, or (grid changed) moves the old counts onto the
   new grid (integer shifts, exact) and raises a flag.
3. ``"histc"``: ``_bin_numbers_kernel`` and ``torch.histc`` count ``x`` on the final grid (below).
   Otherwise ``_pass_kernel`` (re-bin) reads the flag; when it is down every program exits before loading
   anything (the steady state reads ``x`` once); when up, it bins all of ``x`` on the new grid.

Binning (``HIST_STRATEGY``, ``MONO_QUANT_HIST_STRATEGY``), each exact and with the same result:

- ``"histc"`` (the default): the first pass only keeps the min/max partials; once the finalize has fixed
  the grid, ``_bin_numbers_kernel`` writes each value's bin centre as float32 and ``torch.histc`` counts
  them (shared-memory counters on CUDA, no host read: the range is passed as Python numbers),
  ``HISTC_CHUNK`` values per call so that its float32 counts stay exact. That reads ``x`` twice and
  writes and reads 4 bytes per value more, but counting in shared memory is what the GPU needs.
- ``"atomic"``: the fused pass adds every value with a relaxed global integer atomic; the steady state
  reads ``x`` once.
- ``"tl_histogram"``: a private histogram per program with ``tl.histogram`` (indices clamped by hand into
  an extra dump bin: out-of-range behaviour differs across Triton versions), added once per program.
  From Triton 3.8 on it compiles to shared-memory atomics (PTX read for sm_90; not timed, the H200
  machine has 3.6); before, to warp votes that spill about 58 KB per thread.

Measured on an H200 with Triton 3.6 (2026-11-29, 2048 bins, ``benchmarks/results``), 1e8 / 1e9 fp32
values in one run: ``"histc"`` 1.01 / 9.85 ms, ``"atomic"`` 6.98 / 92.9 ms (14 G atomics/s; relaxing
them from acquire-release changed nothing), torch.ao 0.92 ms at 1e8 (it syncs with the host; 5.19 ms
against our 3.93 on LLM-like data, where ``"atomic"`` contends on a few bins and takes 49 ms);
``"tl_histogram"`` took 1055 ms at 1e9 in an earlier run. Tried and removed: a warp-aggregated atomic
binning (``match.any.sync``, inline PTX; lost counts on bf16 inputs on the H200) and a tensor-core one
(int8 matmuls of one-hot matrices; exact but 22 ms at 1e8).
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
from .minmax import _partial_kernel as _minmax_partial_kernel

__all__ = ["HIST_STRATEGIES", "histogram_update_"]

BLOCK = 4096
E_MIN, E_MAX = -126, 126
HIST_STRATEGIES = ("histc", "atomic", "tl_histogram")
# values per torch.histc call of the "histc" binning: its float32 counts stay exact (at most 2**24 a bin)
HISTC_CHUNK = 1 << 24


def _default_strategy() -> str:
    env = os.environ.get("MONO_QUANT_HIST_STRATEGY", "").strip().lower()
    if env and env not in HIST_STRATEGIES:
        raise ValueError(f"MONO_QUANT_HIST_STRATEGY={env!r} is not one of {', '.join(HIST_STRATEGIES)}")
    return env or "histc"  # the fastest measured (see the docstring)


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
):
    """Bin ``x`` on the grid in device memory; fused with the min/max partials, or gated by a flag.

    x: ``(n,)`` contiguous. pmin, pmax: float32 ``(P,)``; pbad: int64 ``(P,)`` (written when ``FUSED``).
    hist: int64 ``(num_bins,)``, added to. exp, org: int64 ``()``, the grid. flag: int32 ``(1,)``, read when
    not ``FUSED``: 0 means nothing to do. ``NB``: a power of two above ``num_bins`` (the last bins are the
    dump for values outside). ``STRATEGY``: ``"atomic"`` or ``"tl_histogram"``.
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
    for t in range(pid, tiles, nprog):
        offs = (t + tl.zeros([], tl.int64)) * BLOCK + lane
        mask = offs < n
        x, finite = load_finite(x_ptr, offs, mask)
        if FUSED:
            mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
        idx, inside = _bin(x, finite, inv_w, origin, num_bins)
        if STRATEGY == "tl_histogram":
            local += tl.histogram(tl.where(inside, idx, NB - 1).to(tl.int32), NB)
        else:
            tl.atomic_add(hist_ptr + idx, tl.full([BLOCK], 1, tl.int64), mask=inside, sem="relaxed")
    if STRATEGY == "tl_histogram":
        b = tl.arange(0, NB)
        tl.atomic_add(hist_ptr + b, local.to(tl.int64), mask=(b < num_bins) & (local > 0), sem="relaxed")
    if FUSED:
        store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad)


@triton.jit
def _bin_numbers_kernel(x_ptr, out_ptr, exp_ptr, org_ptr, start, m, num_bins, BLOCK: tl.constexpr):
    """``out[i] = bin(x[start + i]) + 0.5`` (float32) for ``i < m``, or -1 where ``x`` is not finite or off
    the grid, for ``torch.histc(out, num_bins, 0, num_bins)``: bin centres, so any rounding in its bin
    formula lands in the right bin. Grid: ``(cdiv(m, BLOCK),)``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < m
    x, finite = load_finite(x_ptr + start, offs, mask)
    idx, inside = _bin(x, finite, _inv_width(tl.load(exp_ptr)), tl.load(org_ptr), num_bins)
    tl.store(out_ptr + offs, tl.where(inside, idx.to(tl.float32) + 0.5, -1.0), mask=mask)


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


def histogram_update_(x: torch.Tensor, state, strategy: str | None = None) -> None:
    """Add the finite values of ``x`` to a canonical-grid histogram, in place (see the reference twin).

    Args:
        x: [in] non-empty float tensor.
        state: [in, out] a histogram state (``mono_quant.state.HistogramState``): ``running_min``,
            ``running_max`` float32 ``()``; ``seen`` int64 ``(3,)``; ``exponent``, ``origin`` int64 ``()``;
            ``counts`` int64 ``(B,)``.
        strategy: one of ``HIST_STRATEGIES`` (default ``HIST_STRATEGY``); same result with each.
            ``"histc"`` runs as ``"atomic"`` under ``torch.use_deterministic_algorithms(True)``.

    Raises:
        TypeError: unsupported dtype. ValueError: bad state buffers or strategy.
    """
    strategy = strategy or HIST_STRATEGY
    if strategy not in HIST_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {HIST_STRATEGIES}")
    if strategy == "histc" and torch.are_deterministic_algorithms_enabled():
        # torch refuses (or warns about) histc on CUDA in deterministic mode, although the integer counts
        # here are exact in any order; the atomic binning gives the same counts without asking
        strategy = "atomic"
    running_min, running_max, seen = state.running_min, state.running_max, state.seen
    exponent, origin, counts = state.exponent, state.origin, state.counts
    _check_state(running_min, running_max, seen, exponent, origin, counts)
    x = prepare_input(x)
    n = x.numel()
    num_bins = counts.shape[0]
    num_tiles = triton.cdiv(n, BLOCK)
    programs = min(num_tiles, max_programs(x))
    pmin = torch.empty(2 * programs, dtype=torch.float32, device=x.device)
    pbad = torch.empty(programs + 1, dtype=torch.int64, device=x.device)
    flag = pbad[programs:].view(torch.int32)  # 2 int32 words; the first is the flag
    delta = torch.zeros(num_bins, dtype=torch.int64, device=x.device)
    meta = dict(
        BLOCK=BLOCK,
        NB=triton.next_power_of_2(num_bins + 1),
        STRATEGY=strategy,
        **launch_options(8),
    )
    grid = (programs,)
    pmax = pmin[programs:]
    if strategy == "histc":  # the range first (MinMax's partials); the bins once the grid is final
        _minmax_partial_kernel[grid](x, pmin, pmax, pbad, n, num_tiles, BLOCK=BLOCK, **launch_options(8))
    else:
        _pass_kernel[grid](
            x, pmin, pmax, pbad, delta, exponent, origin, flag, n, num_tiles, num_bins, FUSED=True, **meta
        )
    _finalize_kernel[(1,)](
        pmin, pmax, pbad, programs, running_min, running_max, seen, exponent, origin, counts, delta, flag,
        n, num_bins, BLOCK_P=max(triton.next_power_of_2(programs), 16), BLOCK_B=1024, E_LO=E_MIN, E_HI=E_MAX,
        **launch_options(4),
    )  # fmt: skip
    if strategy == "histc":
        _histc_counts_(x, exponent, origin, counts)
        return
    _pass_kernel[grid](
        x, pmin, pmax, pbad, counts, exponent, origin, flag, n, num_tiles, num_bins, FUSED=False, **meta
    )


def _histc_counts_(
    x: torch.Tensor, exponent: torch.Tensor, origin: torch.Tensor, counts: torch.Tensor
) -> None:
    """Add ``x`` to ``counts`` on its final grid: bin numbers by a kernel, counted by ``torch.histc`` (shared
    memory counters on CUDA), ``HISTC_CHUNK`` values at a time (64 MiB of float32 at most)."""
    n, num_bins = x.numel(), counts.shape[0]
    buf = torch.empty(min(n, HISTC_CHUNK), dtype=torch.float32, device=x.device)
    for start in range(0, n, HISTC_CHUNK):
        m = min(HISTC_CHUNK, n - start)
        _bin_numbers_kernel[(triton.cdiv(m, BLOCK),)](
            x, buf, exponent, origin, start, m, num_bins, BLOCK=BLOCK, **launch_options(8)
        )
        counts += torch.histc(buf[:m], bins=num_bins, min=0, max=num_bins).to(torch.int64)
