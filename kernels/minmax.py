"""Fused min/max kernels: finite min and max, non-finite count and the observer update, per tensor and per
channel. Twins of ``mono_quant.reference.minmax_update_`` and ``minmax_per_channel_update_``.

Two families, the same results bit for bit, chosen per call (``MINMAX_KERNEL``, from
``MONO_QUANT_MINMAX_KERNEL``; the launchers' ``kernel=``):

- ``"two_launch"`` (the default; this file): a two-stage reduction, no atomics on floats, no host read.
  1. a persistent partial kernel reads the input once (native fp32/bf16/fp16, fp64 cast in registers),
     filtering every value, and writes per-program partials: min and max of the finite values
     (``+inf``/``-inf`` if none) and the number of non-finite values;
  2. a tiny finalize kernel reduces the partials and applies the update in place: the min/max merge, or
     the moving average (``_common.ema_update``; started by the first finite batch, a batch with nothing
     finite leaves it), and ``seen += [numel - nonfinite, nonfinite, 1]``.
  The partials need no zeroing (each program writes its own slot) and the kernels are safe to capture
  in a CUDA graph.
- ``"one_launch"`` (opt-in until an H200 run shows it faster: ``minmax_one_launch.py``): no per-value
  filtering in the hot loop, an exact re-read of a program's tiles only where it saw a non-finite value,
  and the last program to finish applies the update.

Per channel, the input is viewed as ``[O, C, I]`` around the channel axis. ``I == 1`` (``[tokens,
hidden]`` with ``ch_axis=-1``, or any last axis) uses row tiles ``[BLOCK_R, BLOCK_C]`` that are
contiguous along the channels; ``I > 1`` (conv ``NCHW`` with ``ch_axis=0`` or ``1``) gives each channel
its own programs, which read contiguous runs of ``I`` values.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import minmax_one_launch
from ._common import (
    Launcher,
    accumulate_partials,
    cdiv,
    count_masked,
    finalize_channels,
    load_kept,
    max_programs,
    next_power_of_2,
    partials,
    prepare_input,
    prepare_mask,
    reduce_partials_and_count,
    store_channel_partials,
    store_partials,
    update_range,
)

__all__ = ["MINMAX_KERNEL", "MINMAX_KERNELS", "minmax_per_channel_update_", "minmax_update_"]

BLOCK = 4096  # elements per tile of the per-tensor reduction
TILE = 4096  # elements per [BLOCK_R, BLOCK_C] tile of the per-channel reductions

# "two_launch": the partial and finalize kernels below; "one_launch": minmax_one_launch.py (opt-in until an
# H200 run shows it faster). Same results, bit for bit.
MINMAX_KERNELS = ("two_launch", "one_launch")
ENV_KERNEL = "MONO_QUANT_MINMAX_KERNEL"


def _default_kernel() -> str:
    env = os.environ.get(ENV_KERNEL, "").strip().lower()
    if env and env not in MINMAX_KERNELS:
        raise ValueError(f"{ENV_KERNEL}={env!r} is not one of {', '.join(MINMAX_KERNELS)}")
    return env or "two_launch"


MINMAX_KERNEL = _default_kernel()  # read at each call: a test or benchmark may set it


def _kernel(kernel: str | None) -> str:
    kernel = kernel or MINMAX_KERNEL
    if kernel not in MINMAX_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(MINMAX_KERNELS)}")
    return kernel


@triton.jit
def _partial_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    keep_ptr,
    n,
    num_tiles,
    keep_div,
    BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Partials of one persistent program over ``x``.

    x: [in] ``(n,)`` contiguous. pmin, pmax: [out] float32 ``(P,)``; pbad: [out] int64 ``(P,)``, P = number
    of programs. keep: [in] uint8 ``(n // keep_div,)``, the token mask (``HAS_MASK``): value ``i`` counts
    where ``keep[i // keep_div]``. Grid: ``(P,)``; program ``p`` reads tiles ``p, p + P, ...`` of ``BLOCK``
    elements.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for t in range(pid, num_tiles, nprog):
        offs = (t + tl.zeros([], tl.int64)) * BLOCK + lane
        x, finite, mask = load_kept(x_ptr, offs, offs < n, keep_ptr, offs // keep_div, HAS_MASK)
        mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
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
    keep_ptr,
    n,
    num_keep,
    keep_div,
    c,
    BLOCK_P: tl.constexpr,
    EMA: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Reduce the partials and update the state in place. Grid: ``(1,)``.

    pmin, pmax: [in] float32 ``(P,)``; pbad: [in] int64 ``(P,)``. rmin, rmax: [in, out] float32 ``()``;
    seen: [in, out] int64 ``(4,)``. keep: [in] uint8 ``(num_keep,)``, the token mask (``HAS_MASK``; each
    entry covers ``keep_div`` values), counted here. ``c``: the averaging constant (used when ``EMA``).
    """
    masked = count_masked(keep_ptr, num_keep, keep_div, HAS_MASK)
    mn, mx = reduce_partials_and_count(
        pmin_ptr, pmax_ptr, pbad_ptr, num_partials, seen_ptr, n, masked, BLOCK_P
    )
    update_range(rmin_ptr, rmax_ptr, 0, True, mn, mx, c, EMA)


@triton.jit
def _rows_partial_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    keep_ptr,
    R,
    C,
    num_row_tiles,
    keep_div,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MASK: tl.constexpr,
):
    """Per-channel partials of ``x`` viewed as ``[R, C]`` (channel axis last, contiguous).

    x: [in]. pmin, pmax: [out] float32 ``(S, C)``; pbad: [out] int64 ``(S, C)``, non-finite values per
    channel. keep: [in] uint8, the token mask: ``MASK == 1``, one entry per ``keep_div`` rows (a mask of
    leading dims); ``MASK == 2``, one per ``keep_div`` values (a mask over the channels too); 0: none.
    Grid: ``(cdiv(C, BLOCK_C), S)``; program ``(cb, s)`` reads row tiles ``s, s + S, ...`` of channel block
    ``cb``, keeps a ``[BLOCK_R, BLOCK_C]`` running min/max and reduces the rows once at the end.
    """
    cb = tl.program_id(0)
    s = tl.program_id(1)
    num_splits = tl.num_programs(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows0 = tl.arange(0, BLOCK_R)
    mn = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    mx = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for t in range(s, num_row_tiles, num_splits):
        rows = (t + tl.zeros([], tl.int64)) * BLOCK_R + rows0
        mask = (rows < R)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        if MASK == 1:  # one division per row
            kidx = (rows // keep_div)[:, None] + (cols * 0)[None, :]
        else:
            kidx = offs // keep_div
        x, finite, mask = load_kept(x_ptr, offs, mask, keep_ptr, kidx, MASK != 0)
        mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
    store_channel_partials(pmin_ptr, pmax_ptr, pbad_ptr, s, C, cols, cmask, mn, mx, bad, 0)


@triton.jit
def _inner_partial_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    keep_ptr,
    C,
    INNER,
    tiles_per_row,
    num_tiles,
    keep_div,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Per-channel partials of ``x`` viewed as ``[O, C, I]`` with ``I > 1`` (contiguous).

    x: [in]. pmin, pmax: [out] float32 ``(S, C)``; pbad: [out] int64 ``(S, C)``. keep: [in] uint8, the token
    mask (``HAS_MASK``): value ``i`` counts where ``keep[i // keep_div]``. Grid:
    ``(cdiv(C, BLOCK_C), S)``; program ``(cb, s)`` reads tiles ``s, s + S, ...`` of channel block ``cb``;
    tile ``t = o * tiles_per_row + j`` holds ``x[o, cb * BLOCK_C : (cb + 1) * BLOCK_C, j * BLOCK_I : (j + 1)
    * BLOCK_I]``. Small ``I`` (conv activations along ``ch_axis=1``) packs several channels in a tile, large
    ``I`` (``ch_axis=0``) gives ``BLOCK_C = 1`` and long contiguous rows; one scalar division per tile.
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
    for t in range(s, num_tiles, num_splits):
        o = t // tiles_per_row + tl.zeros([], tl.int64)  # int64: the offsets pass 2**31
        i = (t - o * tiles_per_row) * BLOCK_I + lane
        mask = cmask[:, None] & (i < INNER)[None, :]
        offs = (o * C + cols[:, None]) * INNER + i[None, :]
        x, finite, mask = load_kept(x_ptr, offs, mask, keep_ptr, offs // keep_div, HAS_MASK)
        mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
    store_channel_partials(pmin_ptr, pmax_ptr, pbad_ptr, s, C, cols, cmask, mn, mx, bad, 1)


@triton.jit
def _channel_finalize_kernel(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_splits,
    C,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    keep_ptr,
    n,
    c,
    num_keep,
    keep_div,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EMA: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Reduce ``(S, C)`` partials over ``S`` and update the per-channel state in place.

    pmin, pmax: [in] float32 ``(S, C)``; pbad: [in] int64 ``(S, C)``. rmin, rmax: [in, out] float32 ``(C,)``;
    seen: [in, out] int64 ``(4,)``. keep: [in] uint8 ``(num_keep,)``, the token mask (``HAS_MASK``), counted
    by program 0. Grid: ``(cdiv(C, BLOCK_C),)``; program ``cb`` reduces channel block ``cb``
    (``_common.finalize_channels``).
    """
    finalize_channels(
        pmin_ptr, pmax_ptr, pbad_ptr, num_splits, C, tl.program_id(0), rmin_ptr, rmax_ptr, seen_ptr, n, c,
        keep_ptr, num_keep, keep_div, BLOCK_S, BLOCK_C, EMA, HAS_MASK,
    )  # fmt: skip


def _check_state(running_min: torch.Tensor, running_max: torch.Tensor, seen: torch.Tensor, shape) -> None:
    for name, t, dtype in (
        ("running_min", running_min, torch.float32),
        ("running_max", running_max, torch.float32),
    ):
        if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float32 tensor of shape {tuple(shape)}, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if seen.dtype != torch.int64 or tuple(seen.shape) != (4,):
        raise ValueError(f"seen must be an int64 tensor of shape (4,), got {seen.dtype} {tuple(seen.shape)}")


_PARTIAL = Launcher(_partial_kernel, 8)
_FINALIZE = Launcher(_finalize_kernel, 4)
_ROWS = Launcher(_rows_partial_kernel, 8)
_INNER = Launcher(_inner_partial_kernel, 8)
_CHANNEL_FINALIZE = Launcher(_channel_finalize_kernel, 4)


def minmax_update_(
    x: torch.Tensor,
    state,
    averaging_constant: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    kernel: str | None = None,
) -> None:
    """Fold the finite min/max of ``x`` into the running range, in place (see the reference twin).

    Args:
        x: [in] non-empty float tensor (fp32/bf16/fp16 read natively, fp64 cast in registers).
        state: [in, out] a range state (``mono_quant.state.RangeState``): ``running_min``,
            ``running_max`` float32 ``()``; ``seen`` int64 ``(4,)``.
        averaging_constant: ``None`` for min/max, else the EMA constant.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``: only the values under ``True``
            count (read by the kernels; the one-launch family takes the two-launch kernels then).
        kernel: one of ``MINMAX_KERNELS`` (default ``MINMAX_KERNEL``, from ``MONO_QUANT_MINMAX_KERNEL``);
            the same result with each.

    Raises:
        TypeError: unsupported dtype. ValueError: bad state buffers, mask or kernel.
    """
    kernel = _kernel(kernel)
    running_min, running_max, seen = state.running_min, state.running_max, state.seen
    _check_state(running_min, running_max, seen, ())
    x = prepare_input(x)
    if kernel == "one_launch" and mask is None:
        minmax_one_launch.minmax_update_(x, state, averaging_constant)
        return
    keep, num_keep, keep_div, has_mask = prepare_mask(x, mask)
    n = x.numel()
    num_tiles = cdiv(n, BLOCK)
    programs = min(num_tiles, max_programs(x))
    pmin, pmax, pbad, _ = partials(x.device, programs)
    args = (x, pmin, pmax, pbad, keep, n, num_tiles, keep_div)
    _PARTIAL((programs,), args, (x, keep, n, num_tiles, keep_div), BLOCK=BLOCK, HAS_MASK=has_mask)
    ema = averaging_constant is not None
    args = (pmin, pmax, pbad, programs, running_min, running_max, seen, keep, n, num_keep, keep_div,
            float(averaging_constant) if ema else 0.0)  # fmt: skip
    varying = args[3:11]
    _FINALIZE((1,), args, varying, BLOCK_P=max(next_power_of_2(programs), 16), EMA=ema, HAS_MASK=has_mask)


def _channel_view(x: torch.Tensor, axis: int) -> tuple[int, int, int]:
    outer = 1
    for s in x.shape[:axis]:
        outer *= s
    inner = 1
    for s in x.shape[axis + 1 :]:
        inner *= s
    return outer, x.shape[axis], inner


def minmax_per_channel_update_(
    x: torch.Tensor,
    ch_axis: int,
    state,
    averaging_constant: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    kernel: str | None = None,
) -> None:
    """Per-channel ``minmax_update_`` along ``ch_axis``.

    Args:
        x: [in] non-empty float tensor, ``C = x.shape[ch_axis]``.
        ch_axis: the channel dimension (negative counts from the end).
        state: [in, out] a range state: ``running_min``, ``running_max`` float32 ``(C,)``; ``seen`` int64
            ``(4,)`` (all channels together).
        averaging_constant, mask, kernel: as in ``minmax_update_``.

    Raises:
        TypeError: unsupported dtype. ValueError: bad ``ch_axis``, state buffers, mask or kernel.
    """
    kernel = _kernel(kernel)
    if x.dim() == 0 or not -x.dim() <= ch_axis < x.dim():
        raise ValueError(f"ch_axis={ch_axis} is out of range for a tensor of shape {tuple(x.shape)}")
    axis = ch_axis % x.dim()
    outer, channels, inner = _channel_view(x, axis)
    running_min, running_max, seen = state.running_min, state.running_max, state.seen
    _check_state(running_min, running_max, seen, (channels,))
    x = prepare_input(x)
    if kernel == "one_launch" and mask is None:
        minmax_one_launch.minmax_per_channel_update_(x, outer, channels, inner, state, averaging_constant)
        return
    keep, num_keep, keep_div, has_mask = prepare_mask(x, mask)
    budget = max_programs(x)
    if inner == 1:
        block_c = min(next_power_of_2(channels), 128 if x.is_cuda else 1024)
        block_r = max(TILE // block_c, 1)
        channel_blocks = cdiv(channels, block_c)
        row_tiles = cdiv(outer, block_r)
        splits = max(1, min(row_tiles, budget // channel_blocks, 65535))
    else:
        block_i = min(next_power_of_2(inner), TILE)
        block_c = min(max(TILE // block_i, 1), next_power_of_2(channels))
        channel_blocks = cdiv(channels, block_c)
        tiles_per_row = cdiv(inner, block_i)
        num_tiles = outer * tiles_per_row
        splits = max(1, min(num_tiles, cdiv(budget, channel_blocks), 65535))
    pmin, pmax, pbad, _ = partials(x.device, splits, channels)
    grid = (channel_blocks, splits)
    if inner == 1:
        # a mask of leading dims covers whole rows of [R, C]: one mask entry per keep_div // C rows
        per_row = has_mask and keep_div % channels == 0
        args = (x, pmin, pmax, pbad, keep, outer, channels, row_tiles,
                keep_div // channels if per_row else keep_div)  # fmt: skip
        mode = 0 if not has_mask else 1 if per_row else 2
        _ROWS(grid, args, args[:1] + args[4:], BLOCK_R=block_r, BLOCK_C=block_c, MASK=mode)
    else:
        args = (x, pmin, pmax, pbad, keep, channels, inner, tiles_per_row, num_tiles, keep_div)
        _INNER(grid, args, args[:1] + args[4:], BLOCK_C=block_c, BLOCK_I=block_i, HAS_MASK=has_mask)
    ema = averaging_constant is not None
    block_c = min(next_power_of_2(channels), 128)
    block_s = min(next_power_of_2(splits), max(2048 // block_c, 1))
    args = (pmin, pmax, pbad, splits, channels, running_min, running_max, seen, keep, x.numel(),
            float(averaging_constant) if ema else 0.0, num_keep, keep_div)  # fmt: skip
    varying = args[3:10] + args[11:]
    _CHANNEL_FINALIZE(
        (cdiv(channels, block_c),), args, varying, BLOCK_S=block_s, BLOCK_C=block_c, EMA=ema,
        HAS_MASK=has_mask,
    )  # fmt: skip
