"""Per-program integer counters for the histogram kernels, behind one switch (``COUNTERS``, a constexpr).

A binning kernel counts each value into one slot of a program-private array of int32 counters, then
flushes the array once. Where those counters live is the backend:

- ``"ptx"``: static shared memory declared in inline PTX (a ``.shared`` array ``mq_hist``, declared
  once per kernel by ``counters_declare``) and incremented with ``red.shared.add.u32 [slot], 1``, which
  ptxas turns into ``ATOMS.POPC.INC`` on sm_90: the lanes of a warp that hit the same word are merged in
  hardware, so concentrated data (most values in a few bins) costs fewer shared atomics, not more. The
  increment is unpredicated: every lane adds 1 somewhere (rejected lanes go to dump slots), because
  ptxas wraps a predicated shared atomic in a branch. CUDA only: the interpreter cannot run inline
  assembly.
- ``"scratch"``: the same counters as a per-program slice ``cnt[pid, :]`` of a global int32 array,
  updated with ``tl.atomic_add``: the interpreter's stand-in for ``"ptx"`` (same slots, same kernel), so
  CI runs the index arithmetic the GPU runs.
- ``"tl_histogram"``: ``tl.histogram`` of each tile added into a register-held per-program histogram of
  ``NBP`` (a power of two) slots. From Triton 3.8 it lowers to shared-memory atomics (``ATOMS.POPC.INC``)
  with a zeroing and a read-back per call; before, to warp ballots whose cost grows with the bin count.
  It runs in the interpreter as it is.

``COUNTERS_ON_GPU`` is the backend a CUDA tensor gets, chosen by the installed Triton at import:
``"ptx"`` on the versions ``benchmarks/compile_sm90.py`` has checked it on (3.6 to 3.9), where its
counting compiles to one unpredicated ``ATOMS.POPC.INC`` per element; ``"tl_histogram"`` from 3.10 on.
(On 3.8 and 3.9 ``tl.histogram`` counts in shared memory too, but its SASS wraps every atomic in a
branch, and it zeroes and reads back its counters per tile in twice the registers.) Override:
``MONO_QUANT_SMEM_COUNTERS``. Static shared memory is capped at 48 KB without an opt-in, so ``"ptx"``
holds at most ``PTX_MAX_SLOTS`` counters; ``"tl_histogram"`` at most ``TL_HISTOGRAM_MAX_SLOTS`` (its
registers). Larger histograms take another binning (the launcher decides).

Every kernel using ``"ptx"`` must call ``counters_declare`` exactly once, outside any loop: a second
declaration of ``mq_hist`` is a ptxas error. The slot tensors passed to ``counters_add`` must not be
replicated across threads (a tile of at least ``32 * num_warps`` elements), or a replicated lane would
count twice; ``benchmarks/compile_sm90.py`` checks the number of shared atomics per tile.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = [
    "COUNTERS_ON_GPU",
    "PTX_MAX_SLOTS",
    "TL_HISTOGRAM_MAX_SLOTS",
    "counters_add",
    "counters_declare",
    "counters_flush",
    "counters_read",
    "counters_zero",
    "ptx_declaration",
]

PTX_MAX_SLOTS = 12 * 1024  # 48 KB of int32: the static shared memory a kernel gets without an opt-in
TL_HISTOGRAM_MAX_SLOTS = 8192  # 32 int32 registers per thread at 256 threads
COUNTER_BACKENDS = ("ptx", "scratch", "tl_histogram")


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _counters_on_gpu() -> str:
    env = os.environ.get("MONO_QUANT_SMEM_COUNTERS", "").strip().lower()
    if env and env not in ("ptx", "tl_histogram"):
        raise ValueError(f"MONO_QUANT_SMEM_COUNTERS={env!r} is not one of ptx, tl_histogram")
    # inline PTX: checked with 3.6 to 3.9; tl.histogram (shared-memory atomics from 3.8.0) beyond
    return env or ("tl_histogram" if _triton_version() >= (3, 10) else "ptx")


COUNTERS_ON_GPU = _counters_on_gpu()


def ptx_declaration(slots: int) -> str:
    """The PTX declaring ``slots`` int32 counters (rounded up to 16 bytes), the ``.shared`` ``mq_hist``."""
    return f".shared .align 16 .b8 mq_hist[{16 * triton.cdiv(slots, 4)}];\n\tmov.u32 $0, 0;"


@triton.jit
def _ptx_store_zero(i):
    return tl.inline_asm_elementwise(
        # the shared address of counter $1 in a, then
        asm="{ .reg .u32 a; mov.u32 a, mq_hist; mad.lo.u32 a, $1, 4, a; "
        "st.shared.u32 [a], 0; mov.u32 $0, 0; }",
        constraints="=r,r",
        args=[i],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _ptx_inc(slot):
    return tl.inline_asm_elementwise(
        # the shared address of counter $1 in a, then
        asm="{ .reg .u32 a; mov.u32 a, mq_hist; mad.lo.u32 a, $1, 4, a; "
        "red.shared.add.u32 [a], 1; mov.u32 $0, 0; }",
        constraints="=r,r",
        args=[slot],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _ptx_read(i):
    return tl.inline_asm_elementwise(
        # the shared address of counter $1 in a, then
        asm="{ .reg .u32 a; mov.u32 a, mq_hist; mad.lo.u32 a, $1, 4, a; ld.shared.u32 $0, [a]; }",
        constraints="=r,r",
        args=[i],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def counters_declare(pid, COUNTERS: tl.constexpr, DECL: tl.constexpr):
    """Declare the ``"ptx"`` counters (``DECL``: ``ptx_declaration``); once per kernel, outside loops."""
    if COUNTERS == "ptx":
        _ = tl.inline_asm_elementwise(
            asm=DECL, constraints="=r,r", args=[pid], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def counters_zero(cnt_ptr, pid, NBS: tl.constexpr, NBP: tl.constexpr, COUNTERS: tl.constexpr):
    """Zero this program's ``NBS`` counters, then a barrier.

    cnt: int32 ``(P, NBS)`` for ``"scratch"`` (unused otherwise). Returns ``(base, local)``: this program's
    slice of ``cnt``, and the ``"tl_histogram"`` counters (int32 ``(NBP,)``; ``(1,)`` for the others).
    """
    base = cnt_ptr + pid.to(tl.int64) * NBS
    if COUNTERS == "tl_histogram":
        local = tl.zeros([NBP], tl.int32)
    else:
        local = tl.zeros([1], tl.int32)
    if COUNTERS == "ptx" or COUNTERS == "scratch":
        for i0 in range(0, NBS, 1024):
            i = tl.minimum(i0 + tl.arange(0, 1024), NBS - 1)
            if COUNTERS == "ptx":
                _ = _ptx_store_zero(i)
            else:
                tl.store(base + i, tl.zeros([1024], tl.int32))
        tl.debug_barrier()
    return base, local


@triton.jit
def counters_add(base, local, slot, NBP: tl.constexpr, COUNTERS: tl.constexpr):
    """Add 1 to counter ``slot`` (int32, any shape, every lane counted) of this program; returns ``local``
    (the ``"tl_histogram"`` counters, ``(NBP,)`` int32; a placeholder for the other backends)."""
    if COUNTERS == "ptx":
        _ = _ptx_inc(slot)
    elif COUNTERS == "scratch":
        tl.atomic_add(base + slot, tl.full(slot.shape, 1, tl.int32), sem="relaxed")
    else:
        local += tl.histogram(tl.reshape(slot, [slot.numel]), NBP)
    return local


@triton.jit
def counters_read(base, i, COUNTERS: tl.constexpr):
    """Counter ``i`` (int32 scalar or tensor) of this program (``"ptx"`` or ``"scratch"``)."""
    if COUNTERS == "ptx":
        return _ptx_read(i)
    else:
        return tl.load(base + i)


@triton.jit
def counters_flush(
    base,
    local,
    out_ptr,
    num_bins,
    NBS: tl.constexpr,
    NBP: tl.constexpr,
    COUNTERS: tl.constexpr,
    ROW: tl.constexpr,
):
    """Write out this program's counters of the ``num_bins`` bins (after a barrier).

    ``ROW``: store counters ``[0, NBS)`` into ``out[0:NBS]`` (int32, a row of a ``(P, NBS)`` scratch, every
    slot written). Otherwise add the non-zero ones of ``[0, num_bins)`` to ``out`` (int64 ``(num_bins,)``)
    with relaxed integer atomics.
    """
    if COUNTERS == "tl_histogram":
        i = tl.arange(0, NBP)
        if ROW:
            tl.store(out_ptr + i, local, mask=i < NBS)
        else:
            m = (i < num_bins) & (local != 0)
            tl.atomic_add(out_ptr + i, local.to(tl.int64), mask=m, sem="relaxed")
    else:
        tl.debug_barrier()
        for i0 in range(0, NBS, 1024):
            i = i0 + tl.arange(0, 1024)
            c = counters_read(base, tl.minimum(i, NBS - 1), COUNTERS)
            if ROW:
                tl.store(out_ptr + i, c, mask=i < NBS)
            else:
                m = (i < num_bins) & (c != 0)
                tl.atomic_add(out_ptr + i, c.to(tl.int64), mask=m, sem="relaxed")
