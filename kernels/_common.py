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
PROGRAMS_PER_SM = 8
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
