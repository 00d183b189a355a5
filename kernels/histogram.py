"""Canonical-grid histogram kernels and their launcher: min/max, grid decision and coarsening on the
device, and binning. Twin of ``mono_quant.reference.histogram_update_``; the grid rule is that of
``mono_quant.grid`` (``canonical_grid``, ``regrid``, ``floor_scaled``, ``bin_index``), re-derived in
``_grid`` because kernels never import mono_quant. An update never reads a value on the host.

Each update bins the batch, then ``_finalize_kernel`` (one program) reduces the min/max partials, merges the
running range, updates ``seen``, computes the canonical grid of the new range (all 253 exponents at once),
adds the batch's counts binned on the old grid, and moves the histogram to the new grid when it changed
(old bin ``j`` to ``((origin + j) >> k) - origin'``: integer shifts, exact). The binnings
(``HIST_STRATEGY``, ``MONO_QUANT_HIST_STRATEGY``) all give the same result:

- ``"histc"`` (the default): the range by ``minmax.py``'s partial kernel, the grid by the finalize, then
  ``_bin_numbers_kernel`` writes each value's bin centre as float32 and ``torch.histc`` counts them
  (shared-memory counters on CUDA; no host read: the range is passed as Python numbers), ``HISTC_CHUNK``
  values per call so that its float32 counts stay exact. Reads ``x`` twice and writes and reads 4 bytes
  per value more.
- ``"smem_rows"``, ``"smem_atomic"``: one read of ``x`` in steady state (``_binning``): a fused pass keeps
  the min/max partials and counts every value into per-program int32 counters in shared memory
  (``_smem``: inline PTX on Triton 3.6 to 3.9, ``tl.histogram`` from 3.10), flushed once per program as an
  int32 row that ``_rows_reduce_kernel`` adds up (``"smem_rows"``) or as integer atomics
  (``"smem_atomic"``).
  Values off the current grid are counted again on the new grid by ``_offgrid_kernel``, from the tiles
  each program noted (a bounded side buffer), or from all its tiles when it noted more.
- ``"tl_histogram"``: the same kernels with ``tl.histogram`` counters on every Triton (before 3.8 it
  lowers to warp ballots), flushed with atomics.
- ``"atomic"``: the same kernels counting with a relaxed global int64 atomic per value.

Under ``TRITON_INTERPRET=1`` the ``"smem_*"`` binnings run the same kernels with ``"scratch"`` counters
(global memory, same slots), so CI runs the index arithmetic the GPU runs. A binning whose counters do not
fit (``counter_slots(B)`` above ``_smem.PTX_MAX_SLOTS``: 48 KB, up to 6141 user bins; above
``_smem.TL_HISTOGRAM_MAX_SLOTS`` for ``tl.histogram``: 4093) runs as ``"histc"``; ``"histc"`` runs as
``"atomic"`` in deterministic mode. Every path is exact for every ``B <= 2**21 + 2`` (``grid.MAX_BINS``
user bins): ``_grid`` says why. Counts are int64 everywhere but the per-program int32 counters (a program
never counts ``2**31`` values: ``PROGRAM_VALUES``). Timings, and the binnings tried and removed:
``benchmarks/README.md``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import _smem
from ._binning import _offgrid_kernel, _pass_kernel, _rows_reduce_kernel
from ._common import (
    count_masked,
    launch_options,
    load_kept,
    max_programs,
    prepare_input,
    prepare_mask,
    reduce_partials_and_count,
)
from ._grid import bin_f32, choose_grid, inv_width, move_counts
from .minmax import _partial_kernel as _minmax_partial_kernel

__all__ = ["HIST_STRATEGIES", "histogram_update_"]

BLOCK = 4096  # elements per tile of the "histc" binning's kernels
# elements per tile of the one-read binnings: 8 per thread at 8 warps, about 60 registers (compile_sm90),
# so PASS_PROGRAMS_PER_SM programs of 256 threads fit on an SM at once (one wave of persistent programs)
PASS_BLOCK = 2048
PASS_PROGRAMS_PER_SM = 4
E_MIN, E_MAX = -126, 126
HIST_STRATEGIES = ("histc", "atomic", "tl_histogram", "smem_rows", "smem_atomic")
# values per torch.histc call of the "histc" binning: its float32 counts stay exact (at most 2**24 a bin)
HISTC_CHUNK = 1 << 24
# tiles with values off the grid that a program notes for re-reading; past that it re-reads all its tiles
SIDE = 16
# at most this many values per program, so that its int32 counters cannot overflow
PROGRAM_VALUES = 1 << 30
ROWS_PER_SPLIT = 64  # rows per program of the rows' reduction (a few hundred programs on an H200)


def _default_strategy() -> str:
    env = os.environ.get("MONO_QUANT_HIST_STRATEGY", "").strip().lower()
    if env and env not in HIST_STRATEGIES:
        raise ValueError(f"MONO_QUANT_HIST_STRATEGY={env!r} is not one of {', '.join(HIST_STRATEGIES)}")
    return env or "histc"  # the fastest measured (benchmarks/README.md)


HIST_STRATEGY = _default_strategy()


@triton.jit
def _bin_numbers_kernel(
    x_ptr, out_ptr, exp_ptr, org_ptr, keep_ptr, start, m, num_bins, keep_div,
    BLOCK: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``out[i] = bin(x[start + i]) + 0.5`` (float32) for ``i < m``, or -1 where ``x`` is not finite, off
    the grid or (``HAS_MASK``) under a False entry ``keep[(start + i) // keep_div]`` of the token mask, for
    ``torch.histc(out, num_bins, 0, num_bins)``: bin centres, so any rounding in its bin formula lands in
    the right bin (``j + 0.5`` is exact for ``j < 2**23``).

    x: [in] ``(start + m,)``; out: [out] float32 ``(m,)``; exp, org: [in] int64 ``()``, the grid; keep: [in]
    uint8, the token mask. Grid: ``(cdiv(m, BLOCK),)``.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    kidx = (offs.to(tl.int64) + start) // keep_div
    x, finite, _ = load_kept(x_ptr + start, offs, offs < m, keep_ptr, kidx, HAS_MASK)
    mask = offs < m
    inv_w = inv_width(tl.load(exp_ptr))
    d, inside = bin_f32(x, finite, inv_w, tl.load(org_ptr).to(tl.float32), num_bins.to(tl.float32))
    tl.store(out_ptr + offs, tl.where(inside, d + 0.5, -1.0), mask=mask)


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
    old_grid_ptr,
    counts_ptr,
    delta_ptr,
    keep_ptr,
    n,
    num_bins,
    num_keep,
    keep_div,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    E_LO: tl.constexpr,
    E_HI: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Reduce the partials, update range and ``seen``, choose the grid, add ``delta``, move the counts.

    pmin, pmax: [in] float32 ``(P,)``; pbad: [in] int64 ``(P,)``. rmin, rmax: [in, out] float32 ``()``;
    seen: [in, out] int64 ``(3,)``; exp, org: [in, out] int64 ``()``, the grid; old_grid: [out] int64
    ``(2,)``, the grid before (for ``_offgrid_kernel``); counts: [in, out] int64 ``(num_bins,)``.
    delta: ``HAS_DELTA``: [in] int64 ``(num_bins,)``, the batch's counts on the old grid; scratch either way.
    keep: [in] uint8 ``(num_keep,)``, the token mask (``HAS_MASK``), its masked values counted here.
    Grid: ``(1,)``.
    """
    masked = count_masked(keep_ptr, num_keep, keep_div, HAS_MASK)
    mn, mx = reduce_partials_and_count(
        pmin_ptr, pmax_ptr, pbad_ptr, num_partials, seen_ptr, n, masked, BLOCK_P
    )
    mn = tl.minimum(tl.load(rmin_ptr), mn)
    mx = tl.maximum(tl.load(rmax_ptr), mx)
    tl.store(rmin_ptr, mn)
    tl.store(rmax_ptr, mx)

    new_e, new_o = choose_grid(mn, mx, num_bins, E_LO, E_HI)
    old_e = tl.load(exp_ptr)
    old_o = tl.load(org_ptr)
    tl.store(old_grid_ptr, old_e)
    tl.store(old_grid_ptr + 1, old_o)
    move_counts(counts_ptr, delta_ptr, num_bins, old_e, old_o, new_e, new_o, BLOCK_B, HAS_DELTA)
    tl.store(exp_ptr, new_e)
    tl.store(org_ptr, new_o)


def _check_state(running_min, running_max, seen, exponent, origin, counts) -> None:
    for name, t, dtype, shape in (
        ("running_min", running_min, torch.float32, ()),
        ("running_max", running_max, torch.float32, ()),
        ("seen", seen, torch.int64, (4,)),
        ("exponent", exponent, torch.int64, ()),
        ("origin", origin, torch.int64, ()),
    ):
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if counts.dtype != torch.int64 or counts.dim() != 1 or not counts.is_contiguous():
        raise ValueError(
            f"counts must be a contiguous 1-D int64 tensor, got {counts.dtype} {tuple(counts.shape)}"
        )


def counter_slots(num_bins: int) -> int:
    """Counters per program for ``num_bins`` bins: the bins, two off-grid slots and the dump slot, rounded
    up to 16 (aligned rows)."""
    return 16 * triton.cdiv(num_bins + 3, 16)


def counter_backend(strategy: str, x: torch.Tensor, num_bins: int) -> str | None:
    """The counters a one-read ``strategy`` uses for ``x`` (``_smem``; ``"global"`` for ``"atomic"``), or
    None when ``num_bins`` bins do not fit in them."""
    slots = counter_slots(num_bins)
    if strategy == "atomic":
        return "global"
    if strategy == "tl_histogram" or (strategy.startswith("smem") and x.is_cuda):
        counters = "tl_histogram" if strategy == "tl_histogram" else _smem.COUNTERS_ON_GPU
    else:  # the smem binnings in the interpreter: the scratch twin of the ptx counters, the same limit
        counters = "scratch"
    if counters == "tl_histogram":
        fits = triton.next_power_of_2(slots) <= _smem.TL_HISTOGRAM_MAX_SLOTS
    else:
        fits = slots <= _smem.PTX_MAX_SLOTS
    return counters if fits else None


def histogram_update_(
    x: torch.Tensor, state, strategy: str | None = None, *, mask: torch.Tensor | None = None
) -> None:
    """Add the finite values of ``x`` to a canonical-grid histogram, in place (see the reference twin).

    Args:
        x: [in] non-empty float tensor.
        state: [in, out] a histogram state (``mono_quant.state.HistogramState``): ``running_min``,
            ``running_max`` float32 ``()``; ``seen`` int64 ``(4,)``; ``exponent``, ``origin`` int64 ``()``;
            ``counts`` int64 ``(B,)``.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``: only the values under ``True``
            count (every binning reads it).
        strategy: one of ``HIST_STRATEGIES`` (default ``HIST_STRATEGY``); same result with each. A
            one-read binning whose counters cannot hold ``B`` bins runs as ``"histc"``, and ``"histc"``
            as ``"atomic"`` under ``torch.use_deterministic_algorithms(True)``.

    Raises:
        TypeError: unsupported dtype. ValueError: bad state buffers or strategy.
    """
    strategy = strategy or HIST_STRATEGY
    if strategy not in HIST_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {HIST_STRATEGIES}")
    _check_state(*state)
    num_bins = state.counts.shape[0]
    counters = None if strategy == "histc" else counter_backend(strategy, x, num_bins)
    if counters is None and torch.are_deterministic_algorithms_enabled():
        # torch refuses (or warns about) histc on CUDA in deterministic mode, although the integer counts
        # here are exact in any order; the atomic binning gives the same counts without asking
        counters = "global"
    x = prepare_input(x)
    keep = prepare_mask(x, mask)
    if counters is None:
        _histc_update_(x, state, keep)
    else:
        _binned_update_(x, state, counters, keep, rows=strategy == "smem_rows")


def _finalize(x, state, pmin, pbad, programs, old_grid, delta, has_delta: bool, keep) -> None:
    num_bins = state.counts.shape[0]
    big = num_bins > 1 << 16  # up to 2**21 + 2 bins: larger chunks, more threads (one program walks them)
    keep_t, num_keep, keep_div, has_mask = keep
    _finalize_kernel[(1,)](
        pmin, pmin[programs:], pbad, programs, state.running_min, state.running_max, state.seen,
        state.exponent, state.origin, old_grid, state.counts, delta, keep_t, x.numel(), num_bins, num_keep,
        keep_div, BLOCK_P=max(triton.next_power_of_2(programs), 16), BLOCK_B=4096 if big else 1024,
        E_LO=E_MIN, E_HI=E_MAX, HAS_DELTA=has_delta, HAS_MASK=has_mask, **launch_options(8 if big else 4),
    )  # fmt: skip


def _histc_update_(x: torch.Tensor, state, keep) -> None:
    """The ``"histc"`` binning: the range (MinMax's partials), the grid, then ``torch.histc`` on it."""
    n, dev = x.numel(), x.device
    num_tiles = triton.cdiv(n, BLOCK)
    programs = min(num_tiles, max_programs(x))
    pmin = torch.empty(2 * programs, dtype=torch.float32, device=dev)
    pbad = torch.empty(programs + 1, dtype=torch.int64, device=dev)  # the last word: the old grid's
    staging = torch.empty(state.counts.shape[0], dtype=torch.int64, device=dev)  # the finalize's
    grid = (programs,)
    keep_t, _, keep_div, has_mask = keep
    _minmax_partial_kernel[grid](
        x, pmin, pmin[programs:], pbad, keep_t, n, num_tiles, keep_div, BLOCK=BLOCK, HAS_MASK=has_mask,
        **launch_options(8),
    )  # fmt: skip
    _finalize(x, state, pmin, pbad, programs, staging, staging, False, keep)
    _histc_counts_(x, state.exponent, state.origin, state.counts, keep)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # a host query, no sync


def _pass_programs(x: torch.Tensor) -> int:
    """Persistent programs of the one-read binnings for ``x`` (before capping at the tile count)."""
    if x.device.type != "cuda":
        return max_programs(x)  # the interpreter: few programs
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * PASS_PROGRAMS_PER_SM


def _binned_update_(x: torch.Tensor, state, counters: str, keep, rows: bool) -> None:
    """The one-read binnings (``_binning``): the pass, the rows' reduction (``rows``), the finalize, the
    values off the old grid, the rows of the programs that re-read."""
    n, num_bins, dev = x.numel(), state.counts.shape[0], x.device
    nbs = counter_slots(num_bins)
    num_full = n // PASS_BLOCK
    programs = min(triton.cdiv(n, PASS_BLOCK), max(_pass_programs(x), triton.cdiv(n, PROGRAM_VALUES)))
    pmin = torch.empty(2 * programs, dtype=torch.float32, device=dev)
    pbad = torch.empty(programs, dtype=torch.int64, device=dev)
    side = torch.empty(programs * (SIDE + 1), dtype=torch.int32, device=dev)
    side_n = side[programs * SIDE :]
    old_grid = torch.empty(2, dtype=torch.int64, device=dev)
    delta = torch.zeros(num_bins, dtype=torch.int64, device=dev)
    scratch = torch.empty(programs * nbs if counters == "scratch" else 1, dtype=torch.int32, device=dev)
    row_buf = torch.empty(programs * nbs if rows else 1, dtype=torch.int32, device=dev)
    keep_t, _, keep_div, has_mask = keep
    meta = dict(
        BLOCK=PASS_BLOCK,
        HAS_MASK=has_mask,
        NBS=nbs,
        NBP=triton.next_power_of_2(nbs) if counters == "tl_histogram" else 1,
        SIDE=SIDE,
        COUNTERS=counters,
        ROWS=rows,
        DECL=_smem.ptx_declaration(nbs) if counters == "ptx" else "",
        **launch_options(8),
    )
    grid = (programs,)
    _pass_kernel[grid](
        x, pmin, pmin[programs:], pbad, side, side_n, scratch, row_buf if rows else delta, state.exponent,
        state.origin, keep_t, n, num_full, num_bins, keep_div, **meta,
    )  # fmt: skip
    if rows:
        _reduce_rows(row_buf, side_n, delta, programs, num_bins, nbs, gated=False)
    _finalize(x, state, pmin, pbad, programs, old_grid, delta, True, keep)
    _offgrid_kernel[grid](
        x, side, side_n, scratch, row_buf if rows else state.counts, state.exponent, state.origin, old_grid,
        keep_t, n, num_full, num_bins, keep_div, **meta,
    )  # fmt: skip
    if rows:
        _reduce_rows(row_buf, side_n, state.counts, programs, num_bins, nbs, gated=True)


def _reduce_rows(rows, side_n, out, programs, num_bins, nbs, gated: bool) -> None:
    block_c = 256
    grid = (triton.cdiv(num_bins, block_c), triton.cdiv(programs, ROWS_PER_SPLIT))
    _rows_reduce_kernel[grid](
        rows, side_n, out, programs, num_bins, ROWS_PER_SPLIT, NBS=nbs, GATED=gated, BLOCK_R=8,
        BLOCK_C=block_c, **launch_options(4),
    )  # fmt: skip


def _histc_counts_(
    x: torch.Tensor, exponent: torch.Tensor, origin: torch.Tensor, counts: torch.Tensor, keep
) -> None:
    """Add ``x`` to ``counts`` on its final grid: bin numbers by a kernel, counted by ``torch.histc`` (shared
    memory counters on CUDA), ``HISTC_CHUNK`` values at a time (64 MiB of float32 at most)."""
    n, num_bins = x.numel(), counts.shape[0]
    buf = torch.empty(min(n, HISTC_CHUNK), dtype=torch.float32, device=x.device)
    keep_t, _, keep_div, has_mask = keep
    for start in range(0, n, HISTC_CHUNK):
        m = min(HISTC_CHUNK, n - start)
        _bin_numbers_kernel[(triton.cdiv(m, BLOCK),)](
            x, buf, exponent, origin, keep_t, start, m, num_bins, keep_div, BLOCK=BLOCK, HAS_MASK=has_mask,
            **launch_options(8),
        )  # fmt: skip
        counts += torch.histc(buf[:m], bins=num_bins, min=0, max=num_bins).to(torch.int64)
