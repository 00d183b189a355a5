"""Amax history kernel: TransformerEngine's delayed-scaling step in one launch. Twin of
``mono_quant.reference.amax_history_update_``.

One launch per step, no host read, no float atomics:

1. every program of a persistent grid reads its tiles of ``x`` once (native fp32/bf16/fp16, fp64 cast in
   registers) and writes its partials (finite min, max, non-finite count), as MinMax's partial kernel;
2. then takes a ticket (an integer atomic on a scratch counter, acquire-release at GPU scope); the program
   that draws the last ticket, when every other program has written its partials, reduces them, updates the
   range and ``seen``, rolls the history with the batch's amax in front, computes the amax of the history
   (``"max"`` / ``"most_recent"``), moves ``scale`` to ``delayed_scale`` and writes the new scale where the
   amax is positive and finite, and puts the counter back to 0 for the next launch.

The counter is back at 0 after every launch, so the kernel is safe to capture in a CUDA graph and replay;
its partials are read past L1 (``.cg``), as another SM wrote them in this launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    accumulate_partials,
    add_seen,
    count_masked,
    launch_options,
    load_kept,
    max_programs,
    prepare_input,
    prepare_mask,
    store_partials,
)

__all__ = ["ALGOS", "amax_history_update_"]

BLOCK = 4096  # elements per tile (MinMax's)
BLOCK_H = 1024  # history slots rolled per step of the last program
ALGOS = {"none": 0, "max": 1, "most_recent": 2}
F32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def amax_scale(amax, scale, mult, div, eps):
    """``reference.amax_scale``: ``clamp(amax * mult / div, eps, max)`` where amax > 0 and finite, else
    ``scale``."""
    # div_rn: IEEE division, rounded to nearest as torch's (Triton's ``/`` is div.full.f32, within 2 ulp)
    t = tl.div_rn(amax * mult, div)
    t = tl.where(tl.abs(t) == float("inf"), tl.div_rn(amax, div) * mult, t)
    t = tl.minimum(tl.maximum(t, eps), F32_MAX)  # t is never NaN here: amax is finite where it is used
    return tl.where((amax > 0) & (amax <= F32_MAX), t, scale)


@triton.jit
def history_finalize(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_partials,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    hist_ptr,
    scale_ptr,
    dscale_ptr,
    n,
    masked,
    hist_len,
    mult,
    div,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ALGO: tl.constexpr,
):
    """The last program's work (see the module docstring), also used by the fused fake-quantize kernel.

    pmin, pmax: float32 ``(P,)``; pbad: int64 ``(P,)``. rmin, rmax, scale, dscale: float32 ``()``; seen:
    int64 ``(4,)``; hist: float32 ``(hist_len,)``. ``masked``: how many of the ``n`` values a token mask
    left out; a batch with every value masked is no step (only ``seen`` counts them).
    """
    offs = tl.arange(0, BLOCK_P)
    m = offs < num_partials
    mn = tl.min(tl.load(pmin_ptr + offs, mask=m, other=float("inf"), cache_modifier=".cg"), 0)
    mx = tl.max(tl.load(pmax_ptr + offs, mask=m, other=float("-inf"), cache_modifier=".cg"), 0)
    bad = tl.sum(tl.load(pbad_ptr + offs, mask=m, other=0, cache_modifier=".cg"), 0)
    add_seen(seen_ptr, n, bad, masked)
    tl.store(rmin_ptr, tl.minimum(tl.load(rmin_ptr), mn))
    tl.store(rmax_ptr, tl.maximum(tl.load(rmax_ptr), mx))
    if masked < n:
        _history_step(hist_ptr, scale_ptr, dscale_ptr, mn, mx, hist_len, mult, div, eps, BLOCK_H, ALGO)


@triton.jit
def _history_step(
    hist_ptr, scale_ptr, dscale_ptr, mn, mx, hist_len, mult, div, eps,
    BLOCK_H: tl.constexpr, ALGO: tl.constexpr,
):  # fmt: skip
    """Roll the history, push the batch's amax (from its finite range ``(mn, mx)``), update the scales."""
    # the batch's amax; 0 when nothing was finite (mn = +inf, mx = -inf); + 0.0 makes a -0.0 (all zeros) +0.0
    a = tl.maximum(tl.maximum(-mn, mx), 0.0) + 0.0
    # roll by one, from the last chunk to the first: chunk c writes slots [c*B + 1, c*B + B], whose last
    # one chunk c + 1 has read already; the barrier keeps each chunk's loads before its stores
    lane = tl.arange(0, BLOCK_H)
    hmax = a
    chunks = tl.cdiv(hist_len, BLOCK_H)
    for i in range(0, chunks):
        src = (chunks - 1 - i) * BLOCK_H + lane
        old = tl.load(hist_ptr + src, mask=src < hist_len - 1, other=0.0)
        hmax = tl.maximum(hmax, tl.max(old, 0))
        tl.debug_barrier()
        tl.store(hist_ptr + src + 1, old, mask=src < hist_len - 1)
        tl.debug_barrier()
    tl.store(hist_ptr, a)
    scale = tl.load(scale_ptr)
    tl.store(dscale_ptr, scale)
    if ALGO == 1:
        tl.store(scale_ptr, amax_scale(hmax, scale, mult, div, eps))
    if ALGO == 2:
        tl.store(scale_ptr, amax_scale(a, scale, mult, div, eps))


@triton.jit
def _amax_history_kernel(
    x_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    ticket_ptr,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    hist_ptr,
    scale_ptr,
    dscale_ptr,
    n,
    num_tiles,
    hist_len,
    mult,
    div,
    eps,
    keep_ptr,
    num_keep,
    keep_div,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ALGO: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """One step of the amax history (module docstring). Grid: ``(P,)`` persistent programs.

    x: ``(n,)`` contiguous. pmin, pmax: float32 ``(P,)``, pbad: int64 ``(P,)`` (scratch, written before
    read). ticket: int32 ``(1,)``, 0 on entry and on exit. The state pointers as in ``history_finalize``.
    keep: [in] uint8 ``(num_keep,)``, the token mask (``HAS_MASK``): value ``i`` counts where
    ``keep[i // keep_div]``; the last program counts the masked values.
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
    tl.debug_barrier()  # every thread's stores before the ticket (which releases them at GPU scope)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == nprog - 1:
        history_finalize(
            pmin_ptr, pmax_ptr, pbad_ptr, nprog, rmin_ptr, rmax_ptr, seen_ptr, hist_ptr, scale_ptr,
            dscale_ptr, n, count_masked(keep_ptr, num_keep, keep_div, HAS_MASK), hist_len, mult, div, eps,
            BLOCK_P, BLOCK_H, ALGO,
        )  # fmt: skip
        tl.store(ticket_ptr, 0)


def check_history_state(state) -> None:
    """Raises ValueError unless ``state`` holds buffers the kernels can write (``mono_quant.history``)."""
    want = {
        "running_min": (torch.float32, ()),
        "running_max": (torch.float32, ()),
        "seen": (torch.int64, (4,)),
        "scale": (torch.float32, ()),
        "delayed_scale": (torch.float32, ()),
        "ticket": (torch.int32, (1,)),
    }
    for name, (dtype, shape) in want.items():
        t = getattr(state, name)
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must be a {dtype} tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}"
            )
    h = state.amax_history
    if h.dtype != torch.float32 or h.dim() != 1 or h.numel() < 1 or not h.is_contiguous():
        raise ValueError(
            f"amax_history must be a contiguous float32 (L,) tensor, got {h.dtype} {tuple(h.shape)}"
        )


def partial_buffers(
    x: torch.Tensor, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Scratch partials of a persistent reduction over a prepared ``x`` in tiles of ``block``:
    ``(pmin, pmax, pbad, P, tiles)``."""
    num_tiles = triton.cdiv(x.numel(), block)
    programs = min(num_tiles, max_programs(x))
    pmin = torch.empty(2 * programs, dtype=torch.float32, device=x.device)
    pbad = torch.empty(programs, dtype=torch.int64, device=x.device)
    return pmin[:programs], pmin[programs:], pbad, programs, num_tiles


def amax_history_update_(
    x: torch.Tensor,
    state,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """One step of an amax history, in place, in one launch (see the reference twin for the maths).

    Args:
        x: [in] non-empty float tensor (fp32/bf16/fp16 read natively, fp64 cast in registers).
        state: [in, out] an ``AmaxHistoryState``: ``running_min``, ``running_max``, ``scale``,
            ``delayed_scale`` float32 ``()``; ``seen`` int64 ``(4,)``; ``amax_history`` float32 ``(L,)``;
            ``ticket`` int32 ``(1,)`` scratch, 0 on entry and exit.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``: only the values under ``True``
            count; a batch with all of them masked is no step.
        algo: ``"max"``, ``"most_recent"`` or ``"none"`` (roll only: the caller sets ``scale``).
        multiplier, divisor, eps: the scale formula's constants (``2**margin``, ``fp8_max``, ``eps``).

    Raises:
        TypeError: unsupported dtype. ValueError: bad state buffers or ``algo``.
    """
    check_history_state(state)
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} is not one of {', '.join(map(repr, ALGOS))}")
    x = prepare_input(x)
    keep, num_keep, keep_div, has_mask = prepare_mask(x, mask)
    pmin, pmax, pbad, programs, num_tiles = partial_buffers(x)
    _amax_history_kernel[(programs,)](
        x, pmin, pmax, pbad, state.ticket, state.running_min, state.running_max, state.seen,
        state.amax_history, state.scale, state.delayed_scale, x.numel(), num_tiles,
        state.amax_history.numel(), float(multiplier), float(divisor), float(eps), keep, num_keep, keep_div,
        BLOCK=BLOCK, BLOCK_P=max(triton.next_power_of_2(programs), 16),
        BLOCK_H=min(BLOCK_H, max(triton.next_power_of_2(state.amax_history.numel()), 16)), ALGO=ALGOS[algo],
        HAS_MASK=has_mask, **launch_options(8),
    )  # fmt: skip
