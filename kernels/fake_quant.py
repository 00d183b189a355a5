"""Fake-quantize kernels: twins of ``mono_quant.reference.fake_quantize_`` (elementwise) and of the delayed
observe + fake-quantize step (``reference.observe_fake_quantize_``: one read of ``x``, one write of the output
and its gradient mask).

The arithmetic is the reference's, operation for operation in float32 (float64 for float64 inputs), without
FP fusion (``launch_options``), so results are equal bit for bit:

- integers: ``q = rint(x * inv_scale) + zp``; ``mask = qmin <= q <= qmax``; ``out = (clamp(q) - zp) * s``.
  ``rint`` is the round-to-nearest-even of adding and subtracting ``1.5 * 2**23`` (``2**52`` in float64),
  exact for ``|v| < 2**22``; larger values stay as they are (they clamp either way).
- FP8: ``y = x / s`` (IEEE division), ``mask = |y| <= fp8_max``, ``y`` clamped and rounded to the format's
  grid by scaling with powers of two (exact): the grid step is ``2**(max(e, EMIN) - MBITS)`` for ``y`` in
  binade ``e``; then ``out = q * s``. The sign of zero is kept as ``Tensor.to(float8)`` keeps it (the
  ``fnuz`` formats have no ``-0``).

NaN stays NaN (mask 0); ``+-inf`` saturates. Per channel, the channel of flat index ``i`` of ``x`` viewed
as ``[O, C, I]`` is ``(i // I) % C``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulate_partials, launch_options, prepare_input, store_partials
from .amax import ALGOS, BLOCK_H, check_history_state, history_finalize, partial_buffers
from .minmax import _check_state, _finalize_kernel

__all__ = ["FP8_FORMATS", "amax_history_fake_quantize_", "fake_quantize_", "observe_fake_quantize_"]

BLOCK = 1024  # elements per program: 8 a thread at 4 warps (55-77 registers for sm_90, no spills)
FUSED_BLOCK = 2048  # elements per tile of the fused delayed kernel (8 a thread at 8 warps)
# float8 dtype -> (FMT id, fp8_max, smallest normal exponent, mantissa bits, no negative zero)
FP8_FORMATS = {
    torch.float8_e4m3fn: (1, 448.0, -6, 3, False),
    torch.float8_e5m2: (2, 57344.0, -14, 2, False),
    torch.float8_e4m3fnuz: (3, 240.0, -7, 3, True),
    torch.float8_e5m2fnuz: (4, 57344.0, -15, 2, True),
}


@triton.jit
def _rint(v, FP64: tl.constexpr):
    """Round half to even of ``v`` where ``|v| < 2**22`` (``2**51``), ``v`` elsewhere (and NaN stays)."""
    if FP64:
        big = 6755399441055744.0  # 1.5 * 2**52
        lim = 2251799813685248.0  # 2**51
    else:
        big = 12582912.0  # 1.5 * 2**23
        lim = 4194304.0  # 2**22
    return tl.where(tl.abs(v) < lim, (v + big) - big, v)


@triton.jit
def fake_quant_int(x, s, inv, zp, qmin, qmax, FP64: tl.constexpr, PRODUCT64: tl.constexpr):
    """Integer fake quantization of a tile: ``(out, mask)``, out in float32 (float64 with ``PRODUCT64``)."""
    if FP64:
        v = x.to(tl.float64) * inv.to(tl.float64)
        q = _rint(v, True) + zp.to(tl.float64)
    else:
        v = x.to(tl.float32) * inv
        q = _rint(v, False) + zp.to(tl.float32)
    mask = (q >= qmin) & (q <= qmax)
    c = tl.where(q < qmin, qmin, tl.where(q > qmax, qmax, q))  # NaN stays NaN (both tests false)
    if FP64:
        d = c - zp.to(tl.float64)
        if PRODUCT64:
            out = d * s.to(tl.float64)
        else:
            out = (d.to(tl.float32) * s).to(tl.float64)
    else:
        out = (c - zp.to(tl.float32)) * s
    return out, mask


@triton.jit
def fake_quant_fp8(x, s, FP8_MAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, FNUZ: tl.constexpr):
    """FP8 fake quantization of a tile: ``(out float32, mask)`` (module docstring)."""
    y = tl.div_rn(x.to(tl.float32), s)
    mask = tl.abs(y) <= FP8_MAX
    a = tl.minimum(tl.abs(y), FP8_MAX)  # NaN: handled below
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    k = tl.maximum(e, EMIN) - MBITS  # the grid step is 2**k
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2**-k, exact
    up = ((127 + k) << 23).to(tl.float32, bitcast=True)  # 2**k
    r = ((a * down + 12582912.0) - 12582912.0) * up  # a * 2**-k < 2**(MBITS + 1): rint is exact
    neg = y.to(tl.int32, bitcast=True) < 0  # the sign bit, also of -0.0
    if FNUZ:
        q = tl.where(neg & (r != 0.0), -r, r)
    else:
        q = tl.where(neg, -r, r)
    out = q * s
    return tl.where(y != y, y, out), mask


@triton.jit
def cast_out(v, dtype: tl.constexpr):
    """``v`` (float32, or float64) in the output dtype, rounded to nearest even as torch's casts. To bf16
    the rounding is done on the bits first (Triton's interpreter truncates a float32 -> bf16 cast; the
    rounded value converts exactly either way); NaN stays NaN."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = tl.where(v != v, v, r.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def _fake_quant_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    zp_ptr,
    n,
    C,
    INNER,
    qmin,
    qmax,
    BLOCK: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    FMT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EMIN: tl.constexpr,
    MBITS: tl.constexpr,
    FNUZ: tl.constexpr,
    FP64: tl.constexpr,
):
    """Fake-quantize ``x`` elementwise. Grid: ``(cdiv(n, BLOCK),)``.

    x: ``(n,)`` contiguous (``[O, C, I]`` per channel); out: ``(n,)`` in x's dtype; mask: bool ``(n,)``;
    scale: float32 ``()`` or ``(C,)``; zp: int32 of the same shape. ``FMT`` 0: integer range
    ``[qmin, qmax]``; 1-4: an FP8 format (``FP8_FORMATS``).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if PER_CHANNEL:
        ch = (offs // INNER) % C
        s = tl.load(scale_ptr + ch, mask=m, other=1.0)
        zp = tl.load(zp_ptr + ch, mask=m, other=0)
    else:
        s = tl.load(scale_ptr)
        zp = tl.load(zp_ptr)
    if FMT == 0:
        inv = tl.div_rn(tl.full([], 1.0, tl.float32), s)
        out, keep = fake_quant_int(x, s, inv, zp, qmin, qmax, FP64, PER_CHANNEL)
    else:
        out, keep = fake_quant_fp8(x, s, FP8_MAX, EMIN, MBITS, FNUZ)
    tl.store(out_ptr + offs, cast_out(out, out_ptr.dtype.element_ty), mask=m)
    tl.store(mask_ptr + offs, keep, mask=m)


def channel_view(shape, ch_axis: int | None) -> tuple[int, int]:
    """``(C, I)`` of a tensor of ``shape`` viewed as ``[O, C, I]`` around ``ch_axis`` (``(1, 1)`` without)."""
    if ch_axis is None:
        return 1, 1
    inner = 1
    for s in shape[ch_axis + 1 :]:
        inner *= s
    return shape[ch_axis], inner


def fp8_constexprs(fp8_dtype) -> dict:
    """The FP8 constexprs of a launch (``FMT`` 0 for an integer target)."""
    if fp8_dtype is None:
        return {"FMT": 0, "FP8_MAX": 0.0, "EMIN": 0, "MBITS": 0, "FNUZ": False}
    if fp8_dtype not in FP8_FORMATS:
        raise ValueError(f"fp8_dtype={fp8_dtype} is not a float8 dtype the kernels know")
    fmt, fmax, emin, mbits, fnuz = FP8_FORMATS[fp8_dtype]
    return {"FMT": fmt, "FP8_MAX": fmax, "EMIN": emin, "MBITS": mbits, "FNUZ": fnuz}


def fake_quantize_(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
    ch_axis: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` (see the reference twin); one read of ``x``, one write of ``out`` and ``mask``.

    Args:
        x: [in] non-empty float tensor (copied once if not contiguous).
        scale: [in] float32 ``()`` or ``(C,)``; zero_point: [in] int32, the same shape.
        quant_min, quant_max: the integer range; fp8_dtype: a float8 dtype or ``None``.
        ch_axis: [in] the channel axis of ``x`` for ``(C,)`` qparams, else ``None``.

    Returns:
        [out] ``(out, mask)``: x's dtype and bool, shaped like ``x`` (contiguous).

    Raises:
        TypeError: unsupported dtype. ValueError: qparams of the wrong dtype or shape.
    """
    xc = prepare_input(x)
    channels, inner = channel_view(x.shape, None if ch_axis is None else ch_axis % max(x.dim(), 1))
    want = (channels,) if ch_axis is not None and scale.dim() == 1 else ()
    for name, t, dtype in (("scale", scale, torch.float32), ("zero_point", zero_point, torch.int32)):
        if t.dtype != dtype or tuple(t.shape) != want:
            raise ValueError(
                f"{name} must be a {dtype} tensor of shape {want}, got {t.dtype} {tuple(t.shape)}"
            )
    out = torch.empty_like(xc)
    mask = torch.empty(xc.shape, dtype=torch.bool, device=xc.device)
    n = xc.numel()
    _fake_quant_kernel[(triton.cdiv(n, BLOCK),)](
        xc, out, mask, scale.contiguous(), zero_point.contiguous(), n, channels, inner, quant_min, quant_max,
        BLOCK=BLOCK, PER_CHANNEL=bool(want), FP64=xc.dtype == torch.float64, **fp8_constexprs(fp8_dtype),
        **launch_options(4),
    )  # fmt: skip
    return out, mask


# --- delayed: fake-quantize with the qparams from before the batch while reducing it into the state ---------


@triton.jit
def _observe_fake_quant_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    zp_ptr,
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    ticket_ptr,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    hist_ptr,
    dscale_ptr,
    n,
    num_tiles,
    qmin,
    qmax,
    hist_len,
    mult,
    div,
    eps,
    BLOCK: tl.constexpr,
    FMT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    EMIN: tl.constexpr,
    MBITS: tl.constexpr,
    FNUZ: tl.constexpr,
    FP64: tl.constexpr,
    HISTORY: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ALGO: tl.constexpr,
):
    """One read of ``x``: its fake quantization with ``scale`` / ``zp`` and its min/max partials.

    Grid: ``(P,)`` persistent programs, tiles ``p, p + P, ...`` of ``BLOCK``. x, out: ``(n,)`` contiguous;
    mask: bool ``(n,)``; scale: float32 ``()``, zp: int32 ``()``; pmin, pmax: float32 ``(P,)``, pbad: int64
    ``(P,)``. ``HISTORY``: the program that draws the last ticket then does the amax-history step
    (``amax.history_finalize``; ``scale_ptr`` is the history's scale, read by every program before its
    ticket, so before the update); otherwise the ticket and the state pointers are not used and the partials
    are reduced by MinMax's finalize kernel.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, BLOCK)
    s = tl.load(scale_ptr)
    zp = tl.load(zp_ptr)
    inv = tl.div_rn(tl.full([], 1.0, tl.float32), s)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for t in range(pid, num_tiles, nprog):
        offs = (t + tl.zeros([], tl.int64)) * BLOCK + lane
        m = offs < n
        raw = tl.load(x_ptr + offs, mask=m, other=0.0)
        x = raw.to(tl.float32)
        finite = m & (tl.abs(x) <= 3.4028234663852886e38)
        mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, m)
        if FMT == 0:
            out, keep = fake_quant_int(raw, s, inv, zp, qmin, qmax, FP64, False)
        else:
            out, keep = fake_quant_fp8(raw, s, FP8_MAX, EMIN, MBITS, FNUZ)
        tl.store(out_ptr + offs, cast_out(out, out_ptr.dtype.element_ty), mask=m)
        tl.store(mask_ptr + offs, keep, mask=m)
    store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad)
    if HISTORY:
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == nprog - 1:
            history_finalize(
                pmin_ptr, pmax_ptr, pbad_ptr, nprog, rmin_ptr, rmax_ptr, seen_ptr, hist_ptr, scale_ptr,
                dscale_ptr, n, tl.zeros([], tl.int64), hist_len, mult, div, eps, BLOCK_P, BLOCK_H, ALGO,
            )  # fmt: skip
            tl.store(ticket_ptr, 0)


def _check_qparams(scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    for name, t, dtype in (("scale", scale, torch.float32), ("zero_point", zero_point, torch.int32)):
        if t.dtype != dtype or t.shape != ():
            raise ValueError(f"{name} must be a 0-d {dtype} tensor, got {t.dtype} {tuple(t.shape)}")


def _launch_observe(x, scale, zero_point, quant_min, quant_max, fp8_dtype, state, history, consts):
    xc = prepare_input(x)
    out = torch.empty_like(xc)
    mask = torch.empty(xc.shape, dtype=torch.bool, device=xc.device)
    pmin, pmax, pbad, programs, num_tiles = partial_buffers(xc, FUSED_BLOCK)
    if history:
        algo, mult, div, eps = consts
        ptrs = (state.ticket, state.running_min, state.running_max, state.seen, state.amax_history,
                state.delayed_scale)  # fmt: skip
        hist_len = state.amax_history.numel()
    else:
        algo, mult, div, eps, hist_len = "none", 1.0, 1.0, 1.0, 1
        ptrs = (pbad, pmin, pmin, pbad, pmin, pmin)  # not used without HISTORY
    _observe_fake_quant_kernel[(programs,)](
        xc, out, mask, scale, zero_point, pmin, pmax, pbad, *ptrs, xc.numel(), num_tiles, quant_min,
        quant_max, hist_len, float(mult), float(div), float(eps), BLOCK=FUSED_BLOCK,
        FP64=xc.dtype == torch.float64, HISTORY=history, BLOCK_P=max(triton.next_power_of_2(programs), 16),
        BLOCK_H=min(BLOCK_H, max(triton.next_power_of_2(hist_len), 16)), ALGO=ALGOS[algo],
        **fp8_constexprs(fp8_dtype), **launch_options(8),
    )  # fmt: skip
    return xc, out, mask, (pmin, pmax, pbad, programs)


def observe_fake_quantize_(
    x: torch.Tensor,
    state,
    averaging_constant: float | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` with ``scale`` / ``zero_point`` and fold it into a range state: one read of ``x``
    (then MinMax's finalize kernel on the partials). Twin of ``reference.observe_fake_quantize_``.

    Args:
        x: [in] non-empty float tensor. state: [in, out] a per-tensor ``RangeState``.
        averaging_constant: ``None`` (min/max) or the EMA constant. scale, zero_point: [in] 0-d float32 /
            int32. quant_min, quant_max, fp8_dtype: the target, as for ``fake_quantize_``.

    Returns:
        [out] ``(out, mask)`` as ``fake_quantize_``.
    """
    _check_state(state.running_min, state.running_max, state.seen, ())
    _check_qparams(scale, zero_point)
    xc, out, mask, (pmin, pmax, pbad, programs) = _launch_observe(
        x, scale, zero_point, quant_min, quant_max, fp8_dtype, None, False, None
    )
    ema = averaging_constant is not None
    _finalize_kernel[(1,)](
        pmin, pmax, pbad, programs, state.running_min, state.running_max, state.seen, pbad, xc.numel(), 1, 1,
        float(averaging_constant) if ema else 0.0, BLOCK_P=max(triton.next_power_of_2(programs), 16), EMA=ema,
        HAS_MASK=False, **launch_options(4),
    )  # fmt: skip
    return out, mask


def amax_history_fake_quantize_(
    x: torch.Tensor,
    state,
    algo: str,
    multiplier: float,
    divisor: float,
    eps: float,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    fp8_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delayed scaling in one launch: fake-quantize ``x`` with ``state.scale`` (from before this batch) and do
    the amax-history step (``amax.amax_history_update_``). Twin of ``reference.amax_history_fake_quantize_``.

    Args:
        x: [in] non-empty float tensor. state: [in, out] an ``AmaxHistoryState``. algo, multiplier,
            divisor, eps: as for ``amax_history_update_`` (``"max"`` / ``"most_recent"``).
        zero_point: [in] 0-d int32. quant_min, quant_max, fp8_dtype: the target.

    Returns:
        [out] ``(out, mask)`` as ``fake_quantize_``.
    """
    check_history_state(state)
    _check_qparams(state.scale, zero_point)
    if algo not in ("max", "most_recent"):
        raise ValueError(f"algo={algo!r}: the fused step computes 'max' or 'most_recent'")
    consts = (algo, multiplier, divisor, eps)
    _, out, mask, _ = _launch_observe(
        x, state.scale, zero_point, quant_min, quant_max, fp8_dtype, state, True, consts
    )
    return out, mask
