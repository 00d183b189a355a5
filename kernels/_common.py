"""Helpers shared by the kernel files: input checks, launch sizes, the jit helpers of the reductions
(loading, partials, the range update) and the host side of a launch (scratch, direct launches).

Launch sizes. On CUDA a reduction runs as a persistent grid of about ``PROGRAMS_PER_SM`` programs per
SM (or as many as fit at once: ``resident_programs``), each looping over tiles with a grid stride
(enough loads in flight to fill the memory system, and a partial result per program). Under
``TRITON_INTERPRET=1`` every program is run in Python one after the other, so few programs with large
tiles are used instead.

Host time. ``partials`` hands out an update's scratch and ``Launcher`` launches a kernel; with
``MONO_QUANT_FAST_LAUNCH=1`` (opt-in) the scratch is cached per (device, stream) and a compiled kernel is
called directly when the launch's specialization matches one seen before.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The two-launch kernels take about 80 registers at 256 threads: 3 programs fit on an SM at once, and 6
# make whole waves (the H200 measurements behind it: benchmarks/README.md, "Launch shapes").
PROGRAMS_PER_SM = 6
INTERPRETER_PROGRAMS = 4
# the default load cache modifier of the reductions' jit helpers; a constexpr, since Triton 3.6 passes a
# plain default (a str) through to tl.load, which then fails
DEFAULT_CACHE = tl.constexpr("")


# Opt-in until an H200 run verifies it: scratch cached per (device, stream) and the compiled kernel called
# directly when a launch's specialization matches one seen before (``Launcher``).
ENV_FAST_LAUNCH = "MONO_QUANT_FAST_LAUNCH"
FAST_LAUNCH = os.environ.get(ENV_FAST_LAUNCH, "0").strip() not in ("", "0")


@functools.cache
def _sm_count(index: int) -> int:
    # a host-side property query, cached: no device synchronization
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(x: torch.Tensor, per_sm: int | None = None) -> int:
    """How many programs a persistent reduction over ``x`` should launch at most: ``per_sm`` (default
    ``PROGRAMS_PER_SM``) per SM on CUDA, ``INTERPRETER_PROGRAMS`` under the interpreter."""
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * (per_sm or PROGRAMS_PER_SM)
    return INTERPRETER_PROGRAMS


def resident_programs(n_regs: int, shared_bytes: int, num_warps: int, props) -> int:
    """How many programs of ``num_warps`` warps, ``n_regs`` registers a thread and ``shared_bytes`` of
    shared memory fit on one SM at once (``props``: ``torch.cuda.get_device_properties``; Hopper's limits
    where it lacks a field). Registers are allocated per warp in units of 256; at most 32 programs."""
    threads = num_warps * 32
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    max_threads = getattr(props, "max_threads_per_multi_processor", 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    fits = [max_threads // threads, (regs // per_warp) // num_warps, 32]
    if shared_bytes:
        fits.append(smem // shared_bytes)
    return max(1, min(fits))


def launch_options(num_warps: int) -> dict:
    """Keywords of every kernel launch: ``num_warps``, and no FP fusion.

    Without fusion no ``a * b + c`` becomes an FMA, so float results are those of the torch twins'
    separately rounded ops (with fusion the EMA ``run + c * (cur - run)`` is rounded once instead of twice),
    and they stay so when Triton's default flips (3.9 warns it will in 3.10).
    ``benchmarks/compile_sm90.py`` checks that no kernel's PTX holds an FMA.
    """
    return {"num_warps": num_warps, "enable_fp_fusion": False}


def prepare_mask(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int, int, bool]:
    """The kernels' view of a token mask: ``(keep, num_keep, keep_div, has_mask)``: a contiguous uint8
    ``(M,)`` view (``x`` itself, unread, without a mask), its length and the values each entry covers.

    Raises:
        ValueError: ``mask`` is not a bool tensor of the leading dims of ``x``.
    """
    if mask is None:
        return x, 1, 1, False
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[: mask.dim()]):
        raise ValueError(
            f"mask must be a bool tensor of the leading dims of x {tuple(x.shape)}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    keep = mask.reshape(-1)
    keep = (keep if keep.is_contiguous() else keep.contiguous()).view(torch.uint8)
    return keep, keep.numel(), x.numel() // max(keep.numel(), 1), True


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
def load_kept(x_ptr, offs, mask, keep_ptr, keep_idx, HAS_MASK: tl.constexpr):
    """``load_finite`` of the lanes in ``x`` (``mask``) whose token-mask entry ``keep[keep_idx]`` is True
    (``HAS_MASK``; otherwise every lane of ``mask``): ``(x, finite, kept)``, ``kept`` the lanes that count.

    keep: uint8 ``(M,)``, the token mask (one entry per ``n // M`` values). Masked lanes load nothing.
    """
    if HAS_MASK:
        mask = mask & (tl.load(keep_ptr + keep_idx, mask=mask, other=0) != 0)
    x, finite = load_finite(x_ptr, offs, mask)
    return x, finite, mask


@triton.jit
def count_masked(keep_ptr, num_keep, keep_div, HAS_MASK: tl.constexpr):
    """The values a token mask leaves out: ``(number of False entries) * keep_div`` (int64 ``()``; 0 without
    ``HAS_MASK``). keep: [in] uint8 ``(num_keep,)``. One program reads the whole mask (a mask covers the
    leading dims of ``x``: ``num_keep`` is the token count, not the value count, but for an elementwise
    mask)."""
    total = tl.zeros([], tl.int64)
    if HAS_MASK:
        acc = tl.zeros([1024], tl.int32)
        lane = tl.arange(0, 1024)
        for s in range(0, num_keep, 1024):
            o = (s + tl.zeros([], tl.int64)) + lane
            acc += (tl.load(keep_ptr + o, mask=o < num_keep, other=1) == 0).to(tl.int32)
        total = tl.sum(acc.to(tl.int64), 0) * keep_div
    return total


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
def reduce_partials_and_count(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_partials,
    seen_ptr,
    n,
    masked,
    BLOCK_P: tl.constexpr,
    CACHE: tl.constexpr = DEFAULT_CACHE,
):
    """The batch's finite min and max from the per-program partials.

    Also adds the batch to ``seen`` (int64 ``(4,)``: finite values, non-finite values, batches, masked
    values), ``masked`` of its ``n`` values left out by a token mask (``count_masked``; the batch counts if
    any is kept). ``CACHE``: the partials' load cache modifier (``".cg"``, through L2, where other programs
    of the same launch wrote them).
    """
    offs = tl.arange(0, BLOCK_P)
    m = offs < num_partials
    mn = tl.min(tl.load(pmin_ptr + offs, mask=m, other=float("inf"), cache_modifier=CACHE), 0)
    mx = tl.max(tl.load(pmax_ptr + offs, mask=m, other=float("-inf"), cache_modifier=CACHE), 0)
    bad = tl.sum(tl.load(pbad_ptr + offs, mask=m, other=0, cache_modifier=CACHE), 0)
    add_seen(seen_ptr, n, bad, masked)
    return mn, mx


@triton.jit
def add_seen(seen_ptr, n, bad, masked):
    """``seen += [n - masked - bad, bad, masked < n, masked]`` (one program; ``Seen``'s slots)."""
    tl.store(seen_ptr, tl.load(seen_ptr) + n - masked - bad)
    tl.store(seen_ptr + 1, tl.load(seen_ptr + 1) + bad)
    tl.store(seen_ptr + 2, tl.load(seen_ptr + 2) + (masked < n).to(tl.int64))
    tl.store(seen_ptr + 3, tl.load(seen_ptr + 3) + masked)


@triton.jit
def finalize_channels(
    pmin_ptr,
    pmax_ptr,
    pbad_ptr,
    num_splits,
    C,
    cb,
    rmin_ptr,
    rmax_ptr,
    seen_ptr,
    n,
    c,
    keep_ptr,
    num_keep,
    keep_div,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EMA: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CACHE: tl.constexpr = DEFAULT_CACHE,
):
    """Reduce channel block ``cb``'s ``(S, C)`` partials over the ``S`` splits and update its channels.

    Reads ``[BLOCK_S, BLOCK_C]`` tiles of partials (a split at a time was one dependent round trip to
    memory per split) and adds the block's non-finite count to ``seen`` with integer atomics (order-free,
    so exact); block 0 also adds ``n``, the batch and, ``HAS_MASK``, the masked values (``count_masked`` of
    the token mask ``keep``). ``CACHE`` as in ``reduce_partials_and_count``.
    """
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_S)
    mn = tl.full([BLOCK_S, BLOCK_C], float("inf"), tl.float32)
    mx = tl.full([BLOCK_S, BLOCK_C], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK_S, BLOCK_C], tl.int64)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + rows
        offs = (s + tl.zeros([], tl.int64))[:, None] * C + cols[None, :]
        m = (s < num_splits)[:, None] & cmask[None, :]
        mn = tl.minimum(mn, tl.load(pmin_ptr + offs, mask=m, other=float("inf"), cache_modifier=CACHE))
        mx = tl.maximum(mx, tl.load(pmax_ptr + offs, mask=m, other=float("-inf"), cache_modifier=CACHE))
        bad += tl.load(pbad_ptr + offs, mask=m, other=0, cache_modifier=CACHE)
    update_range(rmin_ptr, rmax_ptr, cols, cmask, tl.min(mn, 0), tl.max(mx, 0), c, EMA)
    block_bad = tl.sum(tl.sum(bad, 0), 0)
    tl.atomic_add(seen_ptr, -block_bad)
    tl.atomic_add(seen_ptr + 1, block_bad)
    if cb == 0:
        masked = count_masked(keep_ptr, num_keep, keep_div, HAS_MASK)
        tl.atomic_add(seen_ptr, tl.zeros([], tl.int64) + n - masked)
        tl.atomic_add(seen_ptr + 2, (masked < n).to(tl.int64))
        if HAS_MASK:
            tl.atomic_add(seen_ptr + 3, masked)


@triton.jit
def ema_update(run, cur, c):
    """The range update of ``reference._update_range_`` (float32 ``run``, ``cur``; ``c`` float32): the first
    finite batch sets it, an all-non-finite batch (``cur`` infinite) keeps it, ``c == 1`` takes ``cur``,
    otherwise ``run + c * (cur - run)``, computed again in float64 and rounded once where it overflows."""
    run_inf = tl.abs(run) == float("inf")
    cur_inf = tl.abs(cur) == float("inf")
    # the EMA of the finite cases only (inf - inf would be NaN; it is not selected, but keep it quiet)
    run_f = tl.where(run_inf, 0.0, run)
    cur_f = tl.where(cur_inf, 0.0, cur)
    c = c + tl.zeros([], tl.float32)  # a float32 scalar also under the interpreter (a Python float there)
    ema = run_f + c * (cur_f - run_f)
    run64 = run_f.to(tl.float64)
    ema64 = (run64 + c.to(tl.float64) * (cur_f.to(tl.float64) - run64)).to(tl.float32)
    ema = tl.where(tl.abs(ema) == float("inf"), ema64, ema)
    ema = tl.where(c == 1.0, cur_f, ema)
    return tl.where(run_inf, cur, tl.where(cur_inf, run, ema))


@triton.jit
def update_range(rmin_ptr, rmax_ptr, offs, mask, mn, mx, c, EMA: tl.constexpr):
    """Fold a batch's finite range ``(mn, mx)`` into the running range at ``offs`` (``mask``ed): the min/max
    merge, or with ``EMA`` the moving average of ``ema_update``."""
    run_min = tl.load(rmin_ptr + offs, mask=mask, other=0.0)
    run_max = tl.load(rmax_ptr + offs, mask=mask, other=0.0)
    if EMA:
        tl.store(rmin_ptr + offs, ema_update(run_min, mn, c), mask=mask)
        tl.store(rmax_ptr + offs, ema_update(run_max, mx, c), mask=mask)
    else:
        tl.store(rmin_ptr + offs, tl.minimum(run_min, mn), mask=mask)
        tl.store(rmax_ptr + offs, tl.maximum(run_max, mx), mask=mask)


# --- host time per call: scratch once per (device, stream), the compiled kernel called directly ------------
_SCRATCH: dict[tuple, dict[str, torch.Tensor]] = {}
_DIRECT_DEVICES = ("cuda",)  # where a launch compiles a kernel to call directly (not the interpreter)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` in plain Python (Triton's is a constexpr function: microseconds a call)."""
    return -(-a // b)


def next_power_of_2(v: int) -> int:
    """``triton.next_power_of_2`` in plain Python, for a launch's host arithmetic."""
    return 1 << (v - 1).bit_length() if v > 1 else 1


def round4(v: int) -> int:
    return -(-v // 4) * 4


def partials(device: torch.device, rows: int, cols: int | None = None, tickets: int = 0):
    """Scratch for one update: ``(pmin, pmax, pbad, tickets)``, float32, float32 and int64 partials of shape
    ``(rows,)`` or ``(rows, cols)`` (written before they are read: not initialized) and ``(tickets,)`` int32
    tickets, zero (``None`` for none).

    With ``FAST_LAUNCH`` (``MONO_QUANT_FAST_LAUNCH=1``), outside CUDA-graph capture, they are views of
    buffers cached per (device, current stream), grown to the next power of two when a call needs more,
    the views themselves cached per shape: nothing is allocated per call. Why that is safe: launches on one
    stream run in order, so a kernel that reuses the buffers starts after the previous one finished with
    them (another stream has buffers of its own); the partials are written before they are read; the
    tickets are zero before a launch and every kernel that takes one puts it back to 0 before it ends. A
    graph being captured gets fresh buffers from its own memory pool (tickets zeroed by a captured
    memset), never the cache: a replay may run at any later time, beside eager updates. Every cached view
    starts 16-byte aligned, so that the compiled kernels ``Launcher`` keeps (only under ``FAST_LAUNCH``)
    always see the same alignment. Without ``FAST_LAUNCH``: fresh buffers every call.
    """
    shape = (rows,) if cols is None else (rows, cols)
    size = rows * (cols or 1)
    if not FAST_LAUNCH:  # as few allocations and views as can be (no kernel is called directly)
        pmin = torch.empty((2, *shape), dtype=torch.float32, device=device)
        pbad = torch.empty(shape, dtype=torch.int64, device=device)
        return (
            pmin[0],
            pmin[1],
            pbad,
            torch.zeros(tickets, dtype=torch.int32, device=device) if tickets else None,
        )
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # fresh, aligned as the cache's
        return _views(
            (torch.empty(2 * round4(size), dtype=torch.float32, device=device),
             torch.empty(size, dtype=torch.int64, device=device),
             torch.zeros(tickets, dtype=torch.int32, device=device)), shape, size, tickets,
        )  # fmt: skip
    key = (device, _raw_stream(device) if device.type == "cuda" else 0)
    entry = _SCRATCH.get(key)
    if entry is not None and (shape, tickets) in entry["views"]:
        return entry["views"][(shape, tickets)]
    need = (2 * round4(size), size, tickets)
    if entry is None or any(buf.numel() < n for buf, n in zip(entry["buffers"], need, strict=True)):
        grow = lambda v: 1 << max((v - 1).bit_length(), 15)
        sizes = (
            need
            if entry is None
            else [max(n, b.numel()) for b, n in zip(entry["buffers"], need, strict=True)]
        )
        buffers = (
            torch.empty(grow(sizes[0]), dtype=torch.float32, device=device),
            torch.empty(grow(sizes[1]), dtype=torch.int64, device=device),
            torch.zeros(grow(sizes[2]), dtype=torch.int32, device=device),
        )
        entry = _SCRATCH[key] = {"buffers": buffers, "views": {}}
    views = _views(entry["buffers"], shape, size, tickets)
    if len(entry["views"]) >= 64:  # shapes come and go: keep the cache small
        entry["views"].clear()
    entry["views"][(shape, tickets)] = views
    return views


def _views(buffers, shape, size, tickets):
    f32, i64, i32 = buffers
    second = round4(size)  # pmax starts 16 bytes aligned
    return (f32[:size].view(shape), f32[second : second + size].view(shape), i64[:size].view(shape),
            i32[:tickets])  # fmt: skip


def _raw_stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def spec(value) -> tuple | int | None:
    """The part of an argument Triton specializes a kernel on (the rule of Triton 3.6-3.9's
    ``native_specialize_impl``): a tensor's dtype and whether its address is 16-byte aligned; an int's
    ``== 1`` (then a constant), its divisibility by 16 and its width (i32, i64, u64); nothing of a float."""
    if type(value) is int:
        if value == 1:
            return 1
        return value % 16 == 0, -2147483648 <= value < 2147483648, value < 9223372036854775808
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return None


class Launcher:
    """A kernel's launches, with a direct path: under ``FAST_LAUNCH``, the compiled kernel a normal launch
    (``JITFunction.run``) returned is kept under the launch's key, and a later launch with the same key calls
    it directly (``CompiledKernel.run``, as ``JITFunction.run`` does once it has found it), skipping the
    argument binding, specialization and cache lookup of Triton's launch path. The key must determine
    Triton's specialization: the caller passes every argument that can vary between calls in ``varying``
    (``spec`` of each) and passes only 16-byte aligned scratch otherwise (``scratch``); the constexprs and
    the device are part of it. Launch hooks (``triton.knobs.runtime.launch_enter_hook``) take the normal
    path. Under the interpreter there is nothing compiled to keep: always the normal path.
    """

    def __init__(self, fn, num_warps: int):
        self.fn = fn
        self.options = launch_options(num_warps)
        self.names = list(inspect.signature(fn.fn).parameters)
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple, args: tuple, varying: tuple, **constexprs):
        fast = FAST_LAUNCH and args[0].device.type in _DIRECT_DEVICES
        if fast:
            key = (args[0].device, *map(spec, varying), *constexprs.values())
            kernel = self.compiled.get(key)
            if kernel is not None and not _launch_hooks():
                tail = [constexprs[name] for name in self.names[len(args) :]]
                g1 = grid[1] if len(grid) > 1 else 1
                stream = _raw_stream(args[0].device)
                kernel.run(grid[0], g1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None,
                           *args, *tail)  # fmt: skip
                return kernel
        kernel = self.fn[grid](*args, **constexprs, **self.options)
        if fast and getattr(kernel, "packed_metadata", None) is not None:
            self.compiled[key] = kernel
        return kernel


def _launch_hooks() -> bool:
    """Whether a launch hook is set (Triton 3.6: a callable or None; 3.9: a chain of hooks, maybe empty)."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(runtime, name, None)
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False
