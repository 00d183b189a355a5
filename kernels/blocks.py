"""Block-format kernels: the per-block amax of an observer step, and the fused fake-quantize of a format.

Twins of ``mono_quant.reference.block_amax_update_`` and ``block_fake_quantize``. The arithmetic (element
rounding, e8m0 and e4m3 scale codes, the scale rules) is that of ``mono_quant.minifloat`` and
``mono_quant.blockwise``, re-derived here because kernels never import mono_quant: the same float32 ops
in the same order, exact integer bit manipulation elsewhere, IEEE division (``div_rn``) where the rules
divide, and no FMA (``launch_options``), so the results are bit for bit those of the torch twins.

Input ``x`` is viewed as ``[R, C]`` (contiguous) and tiled by ``(1, K)`` blocks (a tile is ``BLOCK_B``
blocks, one per row of a ``[BLOCK_B, K]`` tile, block ``b`` is row ``b // CB``, columns
``(b % CB) * K ...``) or by ``(K, K)`` tiles (one block per step, read ``SUB`` rows at a time). Ragged
edges are masked: a last block holds the elements that exist. Every kernel is persistent: ``P`` programs,
program ``p`` takes tiles ``p, p + P, ...``.

1. ``_amax_rows_kernel`` / ``_amax_tiles_kernel``: one read of ``x``; each block's max of ``|x|`` over its
   finite values is folded into the running ``block_amax`` (each block belongs to one program, so a
   plain load-max-store, no atomics), and each program writes the partial finite min / max / non-finite
   count that ``minmax.py``'s finalize kernel reduces into ``running_min``, ``running_max`` and ``seen``.
   Two launches, no host read: sync-free and CUDA-graph capturable.
2. ``_fq_rows_kernel`` / ``_fq_tiles_kernel``: one read and one write: a block's amax (NaN if it holds a
   NaN, else +Inf if it holds an infinity: ``to_mx``'s rule) or its given scale, the scale, every element
   quantized and dequantized, stored in ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    accumulate_partials,
    launch_options,
    load_kept,
    max_programs,
    prepare_input,
    prepare_mask,
    store_partials,
)
from .minmax import _check_state
from .minmax import _finalize_kernel as _minmax_finalize_kernel

__all__ = ["block_amax_update_", "block_fake_quantize"]

TILE = 4096  # elements per tile (or per step of a (K, K) tile)
RULES = {"e8m0_floor": 0, "e8m0_rceil": 1, "nvfp4": 2, "fp32": 3}
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _round_elem(v, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAXV: tl.constexpr, MAGIC: tl.constexpr):
    """``minifloat.round_to_element``: round to nearest even to ``MBITS`` mantissa bits, saturating at
    ``MAXV``; below ``MIN_NORMAL`` by adding and subtracting ``MAGIC = 2**(emin - MBITS + 23)``; sign
    kept, NaN kept."""
    a = tl.abs(v)
    a = tl.where(a < MAXV, a, MAXV)
    sub = (a + MAGIC) - MAGIC
    b = a.to(tl.int32, bitcast=True)
    rb = (b + ((1 << (22 - MBITS)) - 1) + ((b >> (23 - MBITS)) & 1)) & ~((1 << (23 - MBITS)) - 1)
    r = tl.where(a < MIN_NORMAL, sub, rb.to(tl.float32, bitcast=True))
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def _store_like(y_ptr, offs, y, mask):
    """Store float32 ``y`` in the dtype of ``y_ptr``, rounded to nearest even (bf16 rounded by hand: the
    interpreter's fp32 -> bf16 cast truncates; the cast of the rounded value is then exact everywhere)."""
    if y_ptr.dtype.element_ty == tl.bfloat16:
        b = y.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        y = tl.where(y != y, y, b.to(tl.float32, bitcast=True))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pow2(code):
    """float32 ``2**(code - 127)`` for int32 codes 0..254 (0: the subnormal ``2**-127``)."""
    return tl.where(code == 0, 0x00400000, code << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_value(code):
    """float32 value of e4m3 (``float8_e4m3fn``) codes held as int32 0..255 (0x7F / 0xFF: NaN)."""
    e = (code >> 3) & 15
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    value = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2**-9
    value = tl.where((code & 127) == 127, float("nan"), value)
    return tl.where((code & 128) != 0, -value, value)


@triton.jit
def _factors(
    amax, scale, t, RULE: tl.constexpr, STATIC: tl.constexpr, EMAX: tl.constexpr, MAXV: tl.constexpr
):
    """Per-block ``(quantize factor, dequantize factor)`` from the amax (or the given ``scale``: e8m0 or
    e4m3 codes as int32, or float32), as ``blockwise._factors`` of ``blockwise.scale_codes``.

    ``RULE``: 0 e8m0 floor, 1 e8m0 rceil, 2 nvfp4 (``t``: the per-tensor scale), 3 fp32 (the quantize
    factor is the scale: elements are divided by it).
    """
    if RULE <= 1:
        if STATIC:
            code = scale
        else:
            if RULE == 0:
                exp = ((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 127
                code = tl.minimum(tl.maximum(exp - EMAX, -127), 127) + 127
                code = tl.where(amax <= FLT_MAX, code, 255)  # NaN and Inf: NaN
            else:
                d = tl.math.div_rn(amax, MAXV)
                b = d.to(tl.int32, bitcast=True)
                exp = (b >> 23) & 255
                man = b & 0x7FFFFF
                up = tl.where(exp == 0, man > 0x400000, man != 0)
                code = tl.minimum(exp + up.to(tl.int32), 254)
                code = tl.where(d != d, 255, code)
        nan = code == 255
        q = tl.where(nan, float("nan"), _pow2(tl.where(nan, 0, 254 - code)))
        dq = tl.where(nan, float("nan"), _pow2(tl.where(nan, 0, code)))
    elif RULE == 2:
        if STATIC:
            sb = _e4m3_value(scale)
        else:
            sb = tl.math.div_rn(tl.math.div_rn(amax, MAXV), t)
            sb = tl.where(sb < 0.015625, 0.015625, tl.where(sb > 448.0, 448.0, sb))
            sb = _round_elem(sb, 3, 0.015625, 448.0, 16384.0)  # e4m3
        q = tl.math.div_rn(tl.math.div_rn(1.0, t), sb)
        dq = t * sb
    else:
        if STATIC:
            s = scale
        else:
            s = tl.math.div_rn(amax, 448.0)
            s = tl.where(s == 0.0, 1.0, s)
        q = s
        dq = s
    return q, dq


@triton.jit
def _dynamic_amax(x, mask):
    """Each row's amax as ``blockwise.dynamic_amax`` (``to_mx``): NaN if it holds a NaN, else +Inf if it
    holds an infinity, else the max of ``|x|``."""
    a = tl.abs(x)
    finite = mask & (a <= FLT_MAX)
    fa = tl.where(finite, a, 0.0)
    nan = (mask & (x != x)).to(tl.int32)
    inf = (mask & (a == float("inf"))).to(tl.int32)
    amax, has_nan, has_inf = tl.max(fa, 1), tl.max(nan, 1), tl.max(inf, 1)
    return tl.where(has_nan > 0, float("nan"), tl.where(has_inf > 0, float("inf"), amax))


@triton.jit
def _quant_dequant(
    x, q, dq, RULE: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, MAXV: tl.constexpr,
    MAGIC: tl.constexpr,
):  # fmt: skip
    """Elements quantized by ``q`` (multiplied; ``fp32``: divided), rounded, dequantized by ``dq``."""
    if RULE == 3:
        v = tl.math.div_rn(x, q)
    else:
        v = x * q
    return _round_elem(v, MBITS, MIN_NORMAL, MAXV, MAGIC) * dq


@triton.jit
def _row_blocks(t, lane, blocks, C, CB, K: tl.constexpr, BLOCK_B: tl.constexpr, EVEN: tl.constexpr):
    """Block numbers ``[BLOCK_B]``, element offsets and mask ``[BLOCK_B, K]`` of row-block tile ``t``."""
    b = (t + tl.zeros([], tl.int64)) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < blocks
    if EVEN:  # C % K == 0: the blocks are contiguous
        offs = b[:, None] * K + lane[None, :]
        mask = bmask[:, None] & (lane < K)[None, :]
    else:
        row = b // CB
        col = (b - row * CB) * K
        offs = row[:, None] * C + col[:, None] + lane[None, :]
        mask = bmask[:, None] & ((col[:, None] + lane[None, :]) < C)
    return b, bmask, offs, mask


@triton.jit
def _amax_rows_kernel(
    x_ptr, amax_ptr, pmin_ptr, pmax_ptr, pbad_ptr, keep_ptr, C, CB, blocks, num_tiles, keep_div,
    K: tl.constexpr, BLOCK_B: tl.constexpr, EVEN: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``block_amax = max(block_amax, finite amax of each (1, K) block)`` and this program's partials.

    x: ``(R, C)`` contiguous [in]. amax: float32 ``(R, CB)`` [in, out]. pmin, pmax: float32 ``(P,)``,
    pbad: int64 ``(P,)`` [out]. keep: [in] uint8, the token mask (``HAS_MASK``): value ``i`` counts where
    ``keep[i // keep_div]``. Grid: ``(P,)``; tile ``t`` holds blocks ``t * BLOCK_B ...``.
    """
    pid = tl.program_id(0)
    lane = tl.arange(0, K)
    # per-row (per-block) accumulators: a block's finite min and max give its amax, max(max, -min)
    mn = tl.full([BLOCK_B], float("inf"), tl.float32)
    mx = tl.full([BLOCK_B], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_B], tl.int32)
    for t in range(pid, num_tiles, tl.num_programs(0)):
        b, bmask, offs, mask = _row_blocks(t, lane, blocks, C, CB, K, BLOCK_B, EVEN)
        x, finite, mask = load_kept(x_ptr, offs, mask, keep_ptr, offs // keep_div, HAS_MASK)
        bmin = tl.min(tl.where(finite, x, float("inf")), 1)
        bmax = tl.max(tl.where(finite, x, float("-inf")), 1)
        mn = tl.minimum(mn, bmin)
        mx = tl.maximum(mx, bmax)
        bad += tl.sum((mask & ~finite).to(tl.int32), 1)
        old = tl.load(amax_ptr + b, mask=bmask, other=float("-inf"))
        tl.store(amax_ptr + b, tl.maximum(old, tl.maximum(bmax, -bmin)), mask=bmask)
    store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, mn, mx, bad)


@triton.jit
def _amax_tiles_kernel(
    x_ptr, amax_ptr, pmin_ptr, pmax_ptr, pbad_ptr, keep_ptr, R, C, CB, num_tiles, keep_div,
    K: tl.constexpr, SUB: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """As ``_amax_rows_kernel`` for ``(K, K)`` tiles: amax ``(RB, CB)``; tile ``t`` is block
    ``(t // CB, t % CB)``, read ``[SUB, K]`` rows at a time."""
    pid = tl.program_id(0)
    lane = tl.arange(0, K)
    sub = tl.arange(0, SUB)
    mn = tl.full([SUB, K], float("inf"), tl.float32)
    mx = tl.full([SUB, K], float("-inf"), tl.float32)
    bad = tl.zeros([SUB, K], tl.int32)
    for t in range(pid, num_tiles, tl.num_programs(0)):
        tb = t + tl.zeros([], tl.int64)
        rb = tb // CB
        cols = (tb - rb * CB) * K + lane
        acc = tl.full([SUB, K], float("-inf"), tl.float32)
        for r0 in range(0, K, SUB):
            rows = rb * K + r0 + sub
            mask = (rows < R)[:, None] & (cols < C)[None, :]
            offs = rows[:, None] * C + cols[None, :]
            x, finite, mask = load_kept(x_ptr, offs, mask, keep_ptr, offs // keep_div, HAS_MASK)
            mn, mx, bad = accumulate_partials(mn, mx, bad, x, finite, mask)
            acc = tl.maximum(acc, tl.where(finite, tl.abs(x), float("-inf")))
        amax = tl.max(tl.max(acc, 1), 0)
        tl.store(amax_ptr + tb, tl.maximum(tl.load(amax_ptr + tb), amax))
    store_partials(pmin_ptr, pmax_ptr, pbad_ptr, pid, tl.min(mn, 1), tl.max(mx, 1), tl.sum(bad, 1))


@triton.jit
def _fq_rows_kernel(
    x_ptr, y_ptr, s_ptr, t_ptr, C, CB, blocks, num_tiles,
    K: tl.constexpr, BLOCK_B: tl.constexpr, EVEN: tl.constexpr, RULE: tl.constexpr, STATIC: tl.constexpr,
    MBITS: tl.constexpr, EMAX: tl.constexpr, MAXV: tl.constexpr, MIN_NORMAL: tl.constexpr,
    MAGIC: tl.constexpr,
):  # fmt: skip
    """Fake-quantize ``(1, K)`` blocks: ``y = dequantize(quantize(x))`` in ``x``'s dtype.

    x: ``(R, C)`` [in]; y: ``(R, C)`` like x [out]. s: the given scales ``(R, CB)`` (``STATIC``; e8m0 / e4m3
    codes as uint8, or float32) [in]. t: float32 ``()``, the per-tensor scale (``RULE == 2``) [in].
    """
    pid = tl.program_id(0)
    lane = tl.arange(0, K)
    t = 1.0
    if RULE == 2:
        t = tl.load(t_ptr)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b, bmask, offs, mask = _row_blocks(tile, lane, blocks, C, CB, K, BLOCK_B, EVEN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = 0
        amax = 0.0
        if STATIC:
            scale = tl.load(s_ptr + b, mask=bmask, other=0)
            if RULE <= 2:
                scale = scale.to(tl.int32)
        else:
            amax = _dynamic_amax(x, mask)
        q, dq = _factors(amax, scale, t, RULE, STATIC, EMAX, MAXV)
        y = _quant_dequant(x, q[:, None], dq[:, None], RULE, MBITS, MIN_NORMAL, MAXV, MAGIC)
        _store_like(y_ptr, offs, y, mask)


@triton.jit
def _fq_tiles_kernel(
    x_ptr, y_ptr, s_ptr, t_ptr, R, C, CB, num_tiles,
    K: tl.constexpr, SUB: tl.constexpr, RULE: tl.constexpr, STATIC: tl.constexpr,
    MBITS: tl.constexpr, EMAX: tl.constexpr, MAXV: tl.constexpr, MIN_NORMAL: tl.constexpr,
    MAGIC: tl.constexpr,
):  # fmt: skip
    """Fake-quantize ``(K, K)`` tiles; pointers as ``_fq_rows_kernel``, s: ``(RB, CB)``.

    A tile is read ``[SUB, K]`` rows at a time (a whole 128 x 128 tile in registers spills): once for its
    amax (dynamic scales only), once more to quantize it, the second read served by the L2 cache.
    """
    pid = tl.program_id(0)
    lane = tl.arange(0, K)
    sub = tl.arange(0, SUB)
    t = 1.0
    if RULE == 2:
        t = tl.load(t_ptr)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        tb = tile + tl.zeros([], tl.int64)
        rb = tb // CB
        cols = (tb - rb * CB) * K + lane
        scale = 0
        amax = 0.0
        if STATIC:
            scale = tl.load(s_ptr + tb)
            if RULE <= 2:
                scale = scale.to(tl.int32)
        else:
            fa = tl.zeros([SUB, K], tl.float32)
            nan = tl.zeros([SUB, K], tl.int32)
            inf = tl.zeros([SUB, K], tl.int32)
            for r0 in range(0, K, SUB):
                rows = rb * K + r0 + sub
                mask = (rows < R)[:, None] & (cols < C)[None, :]
                x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                a = tl.abs(x)
                fa = tl.maximum(fa, tl.where(mask & (a <= FLT_MAX), a, 0.0))
                nan = tl.maximum(nan, (mask & (x != x)).to(tl.int32))
                inf = tl.maximum(inf, (mask & (a == float("inf"))).to(tl.int32))
            amax = tl.max(tl.max(fa, 1), 0)
            amax = tl.where(tl.max(tl.max(inf, 1), 0) > 0, float("inf"), amax)
            amax = tl.where(tl.max(tl.max(nan, 1), 0) > 0, float("nan"), amax)
        q, dq = _factors(amax, scale, t, RULE, STATIC, EMAX, MAXV)
        for r0 in range(0, K, SUB):
            rows = rb * K + r0 + sub
            mask = (rows < R)[:, None] & (cols < C)[None, :]
            offs = rows[:, None] * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _store_like(y_ptr, offs, _quant_dequant(x, q, dq, RULE, MBITS, MIN_NORMAL, MAXV, MAGIC), mask)


def _grid(x: torch.Tensor, block: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(R, C, RB, CB)`` of ``x`` viewed as ``[-1, last]`` under ``block``."""
    c = x.shape[-1]
    r = x.numel() // c if c else 0
    return r, c, triton.cdiv(r, block[0]), triton.cdiv(c, block[1])


def _rows_per_tile(k: int, c: int) -> int:
    """Blocks per ``(1, k)`` tile: ``TILE`` elements, half that where ``C % k`` (the ragged offsets cost
    registers: spills at sm_90 otherwise)."""
    return max((TILE if c % k == 0 else TILE // 2) // k, 1)


def _check_block(block: tuple[int, int]) -> int:
    br, k = block
    if br not in (1, k) or k < 1 or k & (k - 1) or k > TILE:
        raise ValueError(
            f"the block kernels take (1, k) or (k, k) blocks, k a power of two <= {TILE}; got {block}"
        )
    return k


def block_amax_update_(
    x: torch.Tensor,
    block: tuple[int, int],
    state,
    block_amax: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> None:
    """Fold the per-block finite amax of ``x`` into ``block_amax`` and its range into ``state``, in place.

    Args:
        x: [in] non-empty float tensor of at least one dimension, viewed as ``[R, C] = [-1, last]``
            (fp32 / bf16 / fp16 read natively, fp64 cast in registers).
        block: ``(1, k)`` or ``(k, k)``, k a power of two.
        state: [in, out] a per-tensor range state: ``running_min``, ``running_max`` float32 ``()``, ``seen``
            int64 ``(4,)``.
        block_amax: [in, out] float32 ``(ceil(R / br), ceil(C / k))``, contiguous.
        mask: [in] ``None``, or a bool tensor of the leading dims of ``x``: only the values under ``True``
            count.

    Raises:
        TypeError: unsupported dtype. ValueError: bad block or state buffers.
    """
    k = _check_block(block)
    _check_state(state.running_min, state.running_max, state.seen, ())
    r, c, rb, cb = _grid(x, block)
    if (
        block_amax.dtype != torch.float32
        or tuple(block_amax.shape) != (rb, cb)
        or not block_amax.is_contiguous()
    ):
        raise ValueError(f"block_amax must be a contiguous float32 tensor of shape {(rb, cb)}, got "
                         f"{block_amax.dtype} {tuple(block_amax.shape)}")  # fmt: skip
    x = prepare_input(x)
    keep, num_keep, keep_div, has_mask = prepare_mask(x, mask)
    if block[0] == 1:
        block_b = _rows_per_tile(k, c)
        tiles = triton.cdiv(rb * cb, block_b)
    else:
        tiles = rb * cb
    programs = min(tiles, max_programs(x))
    pmin = torch.empty(2 * programs, dtype=torch.float32, device=x.device)
    pbad = torch.empty(programs, dtype=torch.int64, device=x.device)
    if block[0] == 1:
        _amax_rows_kernel[(programs,)](
            x, block_amax, pmin, pmin[programs:], pbad, keep, c, cb, rb * cb, tiles, keep_div,
            K=k, BLOCK_B=block_b, EVEN=c % k == 0, HAS_MASK=has_mask, **launch_options(8),
        )  # fmt: skip
    else:
        _amax_tiles_kernel[(programs,)](
            x, block_amax, pmin, pmin[programs:], pbad, keep, r, c, cb, tiles, keep_div,
            K=k, SUB=min(max(TILE // k, 1), k), HAS_MASK=has_mask, **launch_options(8),
        )  # fmt: skip
    _minmax_finalize_kernel[(1,)](
        pmin, pmin[programs:], pbad, programs, state.running_min, state.running_max, state.seen, keep,
        x.numel(), num_keep, keep_div, 0.0, BLOCK_P=max(triton.next_power_of_2(programs), 16), EMA=False,
        HAS_MASK=has_mask, **launch_options(4),
    )  # fmt: skip


def block_fake_quantize(
    x: torch.Tensor,
    block: tuple[int, int],
    rule,
    scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` for a block format, in ``x``'s dtype and shape (one read, one write).

    Args:
        x: [in] float tensor of at least one dimension, viewed as ``[R, C]``.
        block: ``(1, k)`` or ``(k, k)``.
        rule: the format's ``BlockRule`` (``elem`` with ``mbits``, ``emin``, ``emax``, ``max``; ``scale``).
        scales: [in] the block scales ``(RB, CB)`` in the rule's encoding (uint8 or ``float8_e8m0fnu`` e8m0
            codes, ``float8_e4m3fn`` for nvfp4, float32), or ``None``: from each block's dynamic amax.
        tensor_scale: [in] float32 ``()``, the per-tensor scale of ``nvfp4``.

    Returns:
        [out] a new tensor like ``x``.

    Raises:
        TypeError: unsupported dtype. ValueError: bad block, rule or scales.
    """
    k = _check_block(block)
    code = RULES.get(rule.scale)
    if code is None:
        raise ValueError(f"unknown scale rule {rule.scale!r}; one of {', '.join(RULES)}")
    r, c, rb, cb = _grid(x, block)
    x = prepare_input(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    if scales is not None:
        if tuple(scales.shape) != (rb, cb):
            raise ValueError(f"scales must have shape {(rb, cb)}, got {tuple(scales.shape)}")
        scales = scales.contiguous()
        scales = scales if scales.dtype == torch.float32 else scales.view(torch.uint8)
    if code == 2 and tensor_scale is None:
        raise ValueError("nvfp4 needs its per-tensor scale (tensor_scale)")
    s_ptr = scales if scales is not None else x
    t_ptr = tensor_scale.to(torch.float32) if tensor_scale is not None else x
    elem = rule.elem
    consts = dict(
        K=k, RULE=code, STATIC=scales is not None, MBITS=elem.mbits, EMAX=elem.emax, MAXV=float(elem.max),
        MIN_NORMAL=2.0**elem.emin, MAGIC=2.0 ** (elem.emin - elem.mbits + 23),
    )  # fmt: skip
    if block[0] == 1:
        block_b = _rows_per_tile(k, c)
        tiles = triton.cdiv(rb * cb, block_b)
        programs = min(tiles, max_programs(x))
        _fq_rows_kernel[(programs,)](
            x, y, s_ptr, t_ptr, c, cb, rb * cb, tiles, BLOCK_B=block_b, EVEN=c % k == 0, **consts,
            **launch_options(8),
        )  # fmt: skip
    else:
        tiles = rb * cb
        programs = min(tiles, max_programs(x))
        _fq_tiles_kernel[(programs,)](
            x, y, s_ptr, t_ptr, r, c, cb, tiles, SUB=min(max(TILE // k, 1), k), **consts,
            **launch_options(8),
        )  # fmt: skip
    return y
