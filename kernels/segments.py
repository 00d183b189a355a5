"""Segmented min/max (MoE experts): the rows of ``x`` routed to E segments, in one launch.

Maths (the twin: ``mono_quant.reference_segments.minmax_segments_update_``): ``x`` is viewed as
``[N, OUTER, C, INNER]`` (rows, the dims before the channel axis, the channels, the dims after; per tensor
``C = 1``). Each row's finite min / max per channel over its kept values (token mask ``keep``), its kept
finite and non-finite counts and masked count are folded with float atomics into scratch slots
``[E + 1, C]`` for every segment its routing lists (slot ``E``: the dump slot of entries outside ``[0, E)``,
counted in ``invalid``, and of a segment listed twice in one row). The last program to finish (an
acquire-release ticket) folds the slots into the state (min/max or the moving average, exactly as the twin),
adds the counts to ``seen`` and ``tokens_seen``, and resets the scratch, so the next launch finds it blank:
one launch a call, nothing read on the host, the scratch kept per (device, E, C) between calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_options, max_programs, next_power_of_2, prepare_input, prepare_mask, update_range

__all__ = ["minmax_segments_update_"]

BLOCK = 1024  # values per tile of a row (BLOCK_C * BLOCK_I)
_SCRATCH: dict[tuple, tuple[torch.Tensor, ...]] = {}


@triton.jit
def _row_stats(x_ptr, keep_ptr, row, OUTER, C, INNER, cb, keep_div,
               BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """Channel block ``cb`` of row ``row``: finite min, max (float32 ``[BLOCK_C]``) of its kept values, and
    int64 counts of the kept finite, kept non-finite and masked values."""
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    lane = tl.arange(0, BLOCK_I)
    mn = tl.full([BLOCK_C, BLOCK_I], float("inf"), tl.float32)
    mx = tl.full([BLOCK_C, BLOCK_I], float("-inf"), tl.float32)
    fin = tl.zeros([BLOCK_C, BLOCK_I], tl.int32)
    bad = tl.zeros([BLOCK_C, BLOCK_I], tl.int32)
    off = tl.zeros([BLOCK_C, BLOCK_I], tl.int32)
    row_base = (row + tl.zeros([], tl.int64)) * OUTER * C * INNER
    for o in range(0, OUTER):
        for i0 in range(0, INNER, BLOCK_I):
            i = i0 + lane
            m = cmask[:, None] & (i < INNER)[None, :]
            offs = row_base + (o * C + cols[:, None]).to(tl.int64) * INNER + i[None, :]
            inside = m
            if HAS_MASK:
                m = m & (tl.load(keep_ptr + offs // keep_div, mask=m, other=0) != 0)
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            finite = m & (tl.abs(x) <= 3.4028234663852886e38)
            mn = tl.where(finite, tl.minimum(mn, x), mn)
            mx = tl.where(finite, tl.maximum(mx, x), mx)
            fin += finite.to(tl.int32)
            bad += (m & ~finite).to(tl.int32)
            off += (inside & ~m).to(tl.int32)
    n_fin = tl.sum(tl.sum(fin.to(tl.int64), 1), 0)
    n_bad = tl.sum(tl.sum(bad.to(tl.int64), 1), 0)
    n_off = tl.sum(tl.sum(off.to(tl.int64), 1), 0)
    return tl.min(mn, 1), tl.max(mx, 1), n_fin, n_bad, n_off


@triton.jit
def _slot(seg_ptr, row, j, K, E):
    """Routing entry ``j`` of ``row`` as a scratch slot: ``E`` (dump) outside ``[0, E)`` or when an earlier
    entry of the row lists the same segment; and whether it was outside."""
    base = (row + tl.zeros([], tl.int64)) * K
    s = tl.load(seg_ptr + base + j).to(tl.int64)
    outside = (s < 0) | (s >= E)
    dup = s != s  # False
    for jj in range(0, j):
        dup = dup | (tl.load(seg_ptr + base + jj).to(tl.int64) == s)
    return tl.where(outside | dup, E, s), outside


@triton.jit
def _segments_kernel(
    x_ptr, seg_ptr, keep_ptr, smin_ptr, smax_ptr, scnt_ptr, ticket_ptr, rmin_ptr, rmax_ptr, seen_ptr,
    tokens_ptr, invalid_ptr, N, OUTER, C, INNER, K, E, keep_div, c,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_F: tl.constexpr, EMA: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """One segmented update (module docstring). Grid: ``(P,)`` persistent programs over the rows.

    x: [in] ``(N, OUTER, C, INNER)`` contiguous; seg: [in] integer ``(N, K)``; keep: [in] uint8, the token
    mask (``HAS_MASK``: value ``v`` counts where ``keep[v // keep_div]``). smin, smax: [in, out] float32
    ``(E + 1, C)`` scratch, +inf / -inf before and after; scnt: [in, out] int64 ``(E + 1, 4)`` scratch (kept
    finite, kept non-finite, masked, tokens), 0 before and after; ticket: [in, out] int32 ``()``, 0 before
    and after. rmin, rmax: [in, out] float32 ``(E, C)``; seen: [in, out] int64 ``(E, 4)``; tokens: [in,
    out] int64 ``(E,)``; invalid: [in, out] int64 ``()``. ``c``: the averaging constant (``EMA``).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_C)
    for row in range(pid, N, nprog):
        n_fin = tl.zeros([], tl.int64)
        n_bad = tl.zeros([], tl.int64)
        n_off = tl.zeros([], tl.int64)
        for cb in range(0, tl.cdiv(C, BLOCK_C)):
            mn, mx, f, b, o = _row_stats(x_ptr, keep_ptr, row, OUTER, C, INNER, cb, keep_div,
                                         BLOCK_C, BLOCK_I, HAS_MASK)  # fmt: skip
            n_fin += f
            n_bad += b
            n_off += o
            cols = cb * BLOCK_C + cols0
            for j in range(0, K):
                s, _ = _slot(seg_ptr, row, j, K, E)
                tl.atomic_min(smin_ptr + s * C + cols, mn, mask=cols < C, sem="relaxed")
                tl.atomic_max(smax_ptr + s * C + cols, mx, mask=cols < C, sem="relaxed")
        token = n_fin + n_bad > 0  # a row not wholly masked
        for j in range(0, K):
            s, outside = _slot(seg_ptr, row, j, K, E)
            tl.atomic_add(scnt_ptr + s * 4, n_fin, sem="relaxed")
            tl.atomic_add(scnt_ptr + s * 4 + 1, n_bad, sem="relaxed")
            tl.atomic_add(scnt_ptr + s * 4 + 2, n_off, sem="relaxed")
            tl.atomic_add(scnt_ptr + s * 4 + 3, token.to(tl.int64), sem="relaxed")
            tl.atomic_add(invalid_ptr, outside.to(tl.int64), sem="relaxed")
    tl.debug_barrier()  # every thread's atomics before the ticket
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == nprog - 1:
        lane = tl.arange(0, BLOCK_F)
        for start in range(0, E * C, BLOCK_F):
            offs = start + lane
            m = offs < E * C
            mn = tl.load(smin_ptr + offs, mask=m, other=float("inf"), cache_modifier=".cg")
            mx = tl.load(smax_ptr + offs, mask=m, other=float("-inf"), cache_modifier=".cg")
            update_range(rmin_ptr, rmax_ptr, offs, m, mn, mx, c, EMA)
        for start in range(0, (E + 1) * C, BLOCK_F):
            offs = start + lane
            m = offs < (E + 1) * C
            tl.store(smin_ptr + offs, tl.full([BLOCK_F], float("inf"), tl.float32), mask=m)
            tl.store(smax_ptr + offs, tl.full([BLOCK_F], float("-inf"), tl.float32), mask=m)
        for start in range(0, E + 1, BLOCK_F):
            e = start + lane
            m = e < E
            f = tl.load(scnt_ptr + e * 4, mask=m, other=0, cache_modifier=".cg")
            b = tl.load(scnt_ptr + e * 4 + 1, mask=m, other=0, cache_modifier=".cg")
            o = tl.load(scnt_ptr + e * 4 + 2, mask=m, other=0, cache_modifier=".cg")
            t = tl.load(scnt_ptr + e * 4 + 3, mask=m, other=0, cache_modifier=".cg")
            tl.store(seen_ptr + e * 4, tl.load(seen_ptr + e * 4, mask=m) + f, mask=m)
            tl.store(seen_ptr + e * 4 + 1, tl.load(seen_ptr + e * 4 + 1, mask=m) + b, mask=m)
            batches = (f + b > 0).to(tl.int64)
            tl.store(seen_ptr + e * 4 + 2, tl.load(seen_ptr + e * 4 + 2, mask=m) + batches, mask=m)
            tl.store(seen_ptr + e * 4 + 3, tl.load(seen_ptr + e * 4 + 3, mask=m) + o, mask=m)
            tl.store(tokens_ptr + e, tl.load(tokens_ptr + e, mask=m) + t, mask=m)
            zero = tl.zeros([BLOCK_F], tl.int64)
            mall = e < E + 1
            for k in tl.static_range(4):
                tl.store(scnt_ptr + e * 4 + k, zero, mask=mall)
        tl.store(ticket_ptr, 0)


def _scratch(device: torch.device, num_segments: int, channels: int) -> tuple[torch.Tensor, ...]:
    """The blank scratch of ``(device, E, C)``: min / max slots, counts, ticket (the kernel leaves it
    blank again)."""
    key = (device, num_segments, channels)
    if key not in _SCRATCH:
        slots = (num_segments + 1, channels)
        _SCRATCH[key] = (
            torch.full(slots, float("inf"), dtype=torch.float32, device=device),
            torch.full(slots, float("-inf"), dtype=torch.float32, device=device),
            torch.zeros((num_segments + 1, 4), dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int32, device=device),
        )
    return _SCRATCH[key]


def _check_state(state, shape: tuple[int, ...]) -> None:
    e = shape[0]
    want = {
        "running_min": (torch.float32, shape),
        "running_max": (torch.float32, shape),
        "seen": (torch.int64, (e, 4)),
        "tokens_seen": (torch.int64, (e,)),
        "invalid": (torch.int64, ()),
    }
    for name, (dtype, sh) in want.items():
        t = getattr(state, name)
        if t.dtype != dtype or tuple(t.shape) != sh or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {sh}, got {t.dtype} "
                             f"{tuple(t.shape)}")  # fmt: skip


def minmax_segments_update_(
    x: torch.Tensor,
    segments: torch.Tensor,
    state,
    averaging_constant: float | None = None,
    *,
    ch_axis: int | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """Fold the rows of ``x`` into the running range of each segment they are routed to, in place, in one
    launch (see the reference twin for the maths).

    Args:
        x: [in] non-empty float tensor ``[N, ...]`` (fp32/bf16/fp16 read natively, fp64 cast in registers).
        segments: [in] integer ``[N]`` or ``[N, k]``; entries outside ``[0, E)`` are dropped and counted in
            ``state.invalid``.
        state: [in, out] a ``SegmentState``: ``running_min``, ``running_max`` float32 ``(E,)`` or ``(E, C)``;
            ``seen`` int64 ``(E, 4)``; ``tokens_seen`` int64 ``(E,)``; ``invalid`` int64 ``()``.
        averaging_constant: ``None`` for min/max, else the EMA constant.
        ch_axis: ``None`` per tensor, else the channel axis (not 0).
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``.

    Raises:
        ValueError: bad state buffers, ``ch_axis``, ``segments`` shape or mask.
    """
    num_segments = state.tokens_seen.shape[0]
    if segments.dim() not in (1, 2) or segments.shape[0] != x.shape[0]:
        raise ValueError(f"segments of shape {tuple(segments.shape)} do not route x {tuple(x.shape)}")
    n = x.shape[0]
    if ch_axis is None:
        outer, channels, inner = 1, 1, x[0].numel() if n else 1
        _check_state(state, (num_segments,))
    else:
        axis = ch_axis % x.dim()
        if axis == 0:
            raise ValueError(f"ch_axis={ch_axis} is the rows' axis of x {tuple(x.shape)}")
        channels = x.shape[axis]
        outer = x.shape[1:axis].numel()
        inner = x.shape[axis + 1 :].numel()
        _check_state(state, (num_segments, channels))
    x = prepare_input(x)
    keep, _, keep_div, has_mask = prepare_mask(x, mask)
    seg = segments.reshape(n, -1)
    seg = seg if seg.is_contiguous() else seg.contiguous()
    smin, smax, scnt, ticket = _scratch(x.device, num_segments, channels)
    block_c = min(next_power_of_2(channels), BLOCK)
    block_i = max(min(next_power_of_2(inner), BLOCK // block_c), 1)
    programs = max(min(n, max_programs(x)), 1)
    _segments_kernel[(programs,)](
        x, seg, keep, smin, smax, scnt, ticket, state.running_min, state.running_max, state.seen,
        state.tokens_seen, state.invalid, n, outer, channels, inner, seg.shape[1], num_segments, keep_div,
        float(averaging_constant) if averaging_constant is not None else 0.0,
        BLOCK_C=block_c, BLOCK_I=block_i, BLOCK_F=1024, EMA=averaging_constant is not None,
        HAS_MASK=has_mask, **launch_options(4),
    )  # fmt: skip
