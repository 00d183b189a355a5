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


@functools.cache
def _sm_count(index: int) -> int:
    # a host-side property query, cached: no device synchronization
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(x: torch.Tensor) -> int:
    """How many programs a persistent reduction over ``x`` should launch at most."""
    if x.device.type == "cuda":
        return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) * (
            PROGRAMS_PER_SM
        )
    return INTERPRETER_PROGRAMS


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
def reduce_partials_and_count(pmin_ptr, pmax_ptr, pbad_ptr, num_partials, seen_ptr, n, BLOCK_P: tl.constexpr):
    """The batch's finite min and max from the per-program partials.

    Also adds the batch to ``seen`` (int64 ``(3,)``: finite values, non-finite values, batches).
    """
    offs = tl.arange(0, BLOCK_P)
    m = offs < num_partials
    mn = tl.min(tl.load(pmin_ptr + offs, mask=m, other=float("inf")), 0)
    mx = tl.max(tl.load(pmax_ptr + offs, mask=m, other=float("-inf")), 0)
    bad = tl.sum(tl.load(pbad_ptr + offs, mask=m, other=0), 0)
    tl.store(seen_ptr, tl.load(seen_ptr) + n - bad)
    tl.store(seen_ptr + 1, tl.load(seen_ptr + 1) + bad)
    tl.store(seen_ptr + 2, tl.load(seen_ptr + 2) + 1)
    return mn, mx
