"""The observers' statistics in plain torch: the CPU path, the test oracle and the benchmark baseline.

Each public function here has a Triton twin in ``mono_quant.kernels`` with the same signature and the
same result (min/max, counts and grids bit for bit; the EMA to float32 rounding). They update state
tensors in place and never return anything, so a caller can hold the buffers of an ``nn.Module``.

State, shared with the kernels: a ``RangeState`` or a ``HistogramState`` (``mono_quant.state``).

Non-finite values (NaN, +-Inf) are excluded from every statistic and counted. Statistics are those of
the float32 values: a float64 input is converted once (a copy), and its values beyond the float32 range
become +-inf, so they count as non-finite. On CUDA tensors nothing
here reads a value on the host; on CPU tensors the functions branch on values where that skips work
(the non-finite filtering of a batch that turned out finite) with identical results.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mono_quant.grid import canonical_grid, floor_scaled, regrid
from mono_quant.state import HistogramState, RangeState

__all__ = [
    "finite_minmax",
    "finite_minmax_per_channel",
    "histogram_update_",
    "minmax_per_channel_update_",
    "minmax_update_",
]

# Elements per chunk where a float32 temporary is needed: bounds the extra memory of bf16/fp16 and
# non-finite inputs to 16 MiB whatever the tensor size.
CHUNK = 1 << 22
# Elements per binning step on the CPU: small enough that the temporaries stay in cache.
BIN_CHUNK = 1 << 16


def _float32_values(x: torch.Tensor) -> torch.Tensor:
    """``x``, or its float32 values where ``x`` is float64 (the narrower types convert exactly)."""
    return x.float() if x.dtype == torch.float64 else x


def _may_branch(x: torch.Tensor) -> bool:
    """Reading values costs nothing on the CPU (no stream to stall)."""
    return x.device.type == "cpu"


def finite_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min and max of the finite values of ``x`` and the number of non-finite ones.

    Args:
        x: a non-empty float tensor of any shape and strides.

    Returns:
        ``(min, max, nonfinite)``: 0-d float32, float32 (``+inf``/``-inf`` if no value is finite), int64.
    """
    mn, mx = torch.aminmax(x)
    if _may_branch(x) and math.isfinite(mn.item()) and math.isfinite(mx.item()):
        return mn.float(), mx.float(), torch.zeros((), dtype=torch.int64)
    return _finite_minmax_filtered(x)


def _finite_minmax_filtered(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``finite_minmax`` by filtering: chunked, so a float32 temporary never exceeds ``CHUNK`` values."""
    inf = torch.full((), float("inf"), dtype=torch.float32, device=x.device)  # a fill, not a host copy
    mn, mx, bad = inf, -inf, torch.zeros((), dtype=torch.int64, device=x.device)
    for chunk in x.reshape(-1).split(CHUNK):
        finite = torch.isfinite(chunk)
        mn = torch.minimum(mn, torch.where(finite, chunk, inf).amin().float())
        mx = torch.maximum(mx, torch.where(finite, chunk, -inf).amax().float())
        bad = bad + (~finite).sum()
    return mn, mx, bad


def finite_minmax_per_channel(
    x: torch.Tensor, ch_axis: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the finite values of ``x`` along ``ch_axis``, and the non-finite count.

    Args:
        x: a non-empty float tensor with ``C = x.shape[ch_axis]``.

    Returns:
        ``(min, max, nonfinite)``: float32 ``(C,)`` (``+inf``/``-inf`` for a channel with no finite value),
        float32 ``(C,)``, int64 ``()``.
    """
    dims = [d for d in range(x.dim()) if d != ch_axis % x.dim()]
    if not dims:  # a 1-D tensor: every element is its own channel
        finite = torch.isfinite(x)
        mn = torch.where(finite, x, float("inf")).float()
        mx = torch.where(finite, x, float("-inf")).float()
        return mn, mx, (~finite).sum()
    # two reductions: on CPU torch.aminmax(dim=...) is 3-4x slower than amin + amax (measured)
    mn, mx = torch.amin(x, dim=dims), torch.amax(x, dim=dims)
    # NaN or +-Inf in any channel makes the sum non-finite (so can an overflow: that only costs the
    # filtering pass below, never a wrong result)
    if _may_branch(x) and math.isfinite((mn.float() - mx.float()).sum().item()):
        return mn.float(), mx.float(), torch.zeros((), dtype=torch.int64)
    finite = torch.isfinite(x)
    mn = torch.where(finite, x, float("inf")).amin(dim=dims).float()
    mx = torch.where(finite, x, float("-inf")).amax(dim=dims).float()
    return mn, mx, (~finite).sum()


def _count_(seen: torch.Tensor, n: int, bad: torch.Tensor | int) -> None:
    """``seen += [finite, non-finite, 1 batch]`` (the ``Seen`` slots) for a batch of ``n`` values, ``bad`` of
    them non-finite."""
    if _may_branch(seen):
        # in place through numpy's view of the CPU buffer: 1 us, where building a tensor of the three
        # host integers and adding it takes 4 (an int64 buffer never takes part in autograd)
        b = int(bad)
        seen.numpy()[:] += (n - b, b, 1)
    else:
        seen += torch.stack([n - bad, bad, torch.ones_like(bad)])


def _update_range_(
    state: RangeState, mn: torch.Tensor, mx: torch.Tensor, averaging_constant: float | None
) -> None:
    running_min, running_max = state.running_min, state.running_max
    if averaging_constant is None:
        torch.minimum(running_min, mn, out=running_min)
        torch.maximum(running_max, mx, out=running_max)
        return
    c = averaging_constant
    if _may_branch(running_min) and running_min.dim() == 0:
        # per tensor on CPU: branch on the values, and do the same float32 ops on numpy scalars (each
        # rounded to float32 as torch rounds them; a third of the time of three tensor ops)
        for run, cur in ((running_min, mn), (running_max, mx)):
            r, v = np.float32(run.item()), np.float32(cur.item())
            if math.isinf(r):
                run.fill_(float(v))
            elif not math.isinf(v):
                run.fill_(float(r + (v - r) * np.float32(c)))
        return
    for run, cur in ((running_min, mn), (running_max, mx)):
        # first finite batch (run is still +-inf): take it; a batch with nothing finite: keep the old value
        ema = run + c * (cur - run)
        run.copy_(torch.where(torch.isinf(run), cur, torch.where(torch.isinf(cur), run, ema)))


def minmax_update_(x: torch.Tensor, state: RangeState, averaging_constant: float | None = None) -> None:
    """Fold the finite min/max of ``x`` into the running range, in place.

    ``averaging_constant=None``: running min/max. Otherwise the moving average
    ``run = run + c * (batch - run)`` (that is ``(1 - c) * run + c * batch``), started by the first batch
    with a finite value; a batch with no finite value leaves it unchanged.

    Args:
        x: non-empty float tensor. state: a per-tensor ``RangeState`` (``()`` running min/max).
    """
    x = _float32_values(x)
    if _may_branch(x):  # CPU: the common all-finite batch without the non-finite bookkeeping tensors
        mn, mx = torch.aminmax(x)
        if math.isfinite(mn.item()) and math.isfinite(mx.item()):
            _update_range_(state, mn.float(), mx.float(), averaging_constant)
            _count_(state.seen, x.numel(), 0)
            return
        mn, mx, bad = _finite_minmax_filtered(x)
    else:
        mn, mx, bad = finite_minmax(x)
    _update_range_(state, mn, mx, averaging_constant)
    _count_(state.seen, x.numel(), bad)


def minmax_per_channel_update_(
    x: torch.Tensor, ch_axis: int, state: RangeState, averaging_constant: float | None = None
) -> None:
    """Per-channel ``minmax_update_`` along ``ch_axis``: the state's running min/max are float32 ``(C,)``."""
    x = _float32_values(x)
    mn, mx, bad = finite_minmax_per_channel(x, ch_axis)
    _update_range_(state, mn, mx, averaging_constant)
    _count_(state.seen, x.numel(), bad)


def histogram_update_(x: torch.Tensor, state: HistogramState) -> None:
    """Add the finite values of ``x`` to a canonical-grid histogram, in place.

    The new grid is ``canonical_grid`` of the range seen so far, the old counts move to it exactly, then
    ``x`` is binned on it (see ``mono_quant.grid``).

    Args:
        x: non-empty float tensor. state: the histogram, updated in place.
    """
    exponent, origin, counts = state.exponent, state.origin, state.counts
    num_bins = counts.shape[0]
    x = _float32_values(x)
    host = _may_branch(x)
    mn, mx, bad = finite_minmax(x)
    # the grid is a function of the range: on CPU, a batch inside the range seen skips the grid work
    grows = not host or mn.item() < state.running_min.item() or mx.item() > state.running_max.item()
    if grows:
        _update_range_(state.range, mn, mx, None)
        new_e, new_o = canonical_grid(state.running_min, state.running_max, num_bins)
        counts.copy_(regrid(counts, exponent, origin, new_e, new_o))
        exponent.copy_(new_e)
        origin.copy_(new_o)
    if host:  # the grid as Python numbers: 2**-e and origin (< 2**25) are exact float32 scalars
        e = int(exponent)
        inv_w, offset = 2.0**-e, float(origin)
    else:
        e = None
        inv_w = torch.ldexp(torch.ones((), dtype=torch.float32, device=x.device), -exponent).to(torch.float32)
        offset = origin.to(torch.float32)
    # x * 2**-e underflows only for a coarse grid (e > 0); on CPU the fix-up pass is skipped otherwise
    fix_underflow = not host or e > 0
    all_finite = host and int(bad) == 0
    step = BIN_CHUNK if host else CHUNK
    flat = x.reshape(-1)
    for chunk in (flat,) if flat.numel() <= step else flat.split(step):
        chunk = chunk.to(torch.float32)
        if fix_underflow:  # a tiny negative can underflow to -0.0, whose floor is 0: pinned to -1
            t = floor_scaled(chunk, inv_w)
        else:
            t = chunk * inv_w  # exact: a power of two
            t.floor_()
        t -= offset  # integers below 2**25: exact
        if all_finite:  # every t is a bin number in [0, B): bincount is 4x faster than histc on CPU
            counts += torch.bincount(t.to(torch.int64), minlength=num_bins)
            continue
        # t holds integer bin numbers; with edges at -0.5, 0.5, ... every integer lands in its own bin
        # whatever histc's rounding, and NaN / +-Inf fall outside and are skipped. Float counts are exact
        # per chunk (< 2**24 values). No data-dependent shape, no host read.
        counts += torch.histc(t, bins=num_bins, min=-0.5, max=num_bins - 0.5).to(torch.int64)
    _count_(state.seen, x.numel(), bad)


# --- block formats (issue 16): twins of mono_quant.kernels.blocks -------------------------------------------
# The arithmetic is in mono_quant.blockwise (block grids, amaxes, scale rules) and mono_quant.minifloat
# (element rounding, e8m0 / e4m3 codes).

from mono_quant.blockwise import (  # noqa: E402
    dynamic_amax,
    fake_quantize_blocks,
    finite_block_amax,
    scale_codes,
)

__all__ += ["block_amax_update_", "block_fake_quantize"]


def block_amax_update_(
    x: torch.Tensor, block: tuple[int, int], state: RangeState, block_amax: torch.Tensor
) -> None:
    """Fold the per-block max of ``|x|`` over the finite values into ``block_amax``, and the finite min / max
    and the counts of ``x`` into ``state``, in place.

    Args:
        x: non-empty float tensor of at least one dimension, viewed as ``[R, C] = [-1, last]``.
        block: ``(1, k)`` or ``(k, k)``.
        state: a per-tensor ``RangeState`` (``()`` running min/max, ``seen``).
        block_amax: float32 ``(ceil(R / br), ceil(C / bc))``, ``-inf`` where no finite value was seen.
    """
    x2d = _float32_values(x).reshape(-1, x.shape[-1])
    amax, bad = finite_block_amax(x2d, block)
    torch.maximum(block_amax, amax, out=block_amax)
    if _may_branch(x2d) and int(bad) == 0:  # every value finite: the plain min / max
        mn, mx = torch.aminmax(x2d)
        mn, mx = mn.float(), mx.float()
    else:
        mn, mx, bad = finite_minmax(x2d)
    _update_range_(state, mn, mx, None)
    _count_(state.seen, x2d.numel(), bad)


def block_fake_quantize(
    x: torch.Tensor,
    block: tuple[int, int],
    rule,
    scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` for a block format, in ``x``'s dtype and shape.

    Args:
        x: float tensor of at least one dimension, viewed as ``[R, C]``.
        block: ``(1, k)`` or ``(k, k)``.
        rule: the format's ``blockwise.BlockRule``.
        scales: the block scales ``(RB, CB)`` in the rule's encoding (e8m0 codes as uint8 or
            ``float8_e8m0fnu``, ``float8_e4m3fn`` for nvfp4, float32), or ``None``: from each block's
            dynamic amax (``blockwise.dynamic_amax``).
        tensor_scale: float32 ``()``, the per-tensor scale of ``nvfp4``.

    Raises:
        ValueError: ``nvfp4`` without ``tensor_scale``.
    """
    if rule.scale == "nvfp4" and tensor_scale is None:
        raise ValueError("nvfp4 needs its per-tensor scale (tensor_scale)")
    x2d = _float32_values(x).reshape(-1, x.shape[-1])
    if scales is None:
        codes = scale_codes(dynamic_amax(x2d, block), rule, tensor_scale)
    elif rule.scale.startswith("e8m0"):
        codes = scales.view(torch.uint8)
    else:
        codes = scales.float()
    out = fake_quantize_blocks(x2d, block, rule, codes, tensor_scale)
    return out.to(x.dtype).reshape(x.shape)
