"""Compile every kernel for sm_90 (H100/H200) without a GPU and report registers and spills.

Uses ``triton.compile`` on an ``ASTSource`` with ``GPUTarget("cuda", 90, 32)``, then the ptxas that ships
with triton (``ptxas -v``) on the PTX for the register and spill counts, each with the options of its
launches (``kernels._common.launch_options``). Exits 1 if any kernel spills or its PTX holds an FMA (the
launches ask for no FP fusion, so that float results match the torch twins bit for bit).
Run: ``python benchmarks/compile_sm90.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret

import triton  # noqa: E402
from mono_quant.kernels import histogram as khist  # noqa: E402
from mono_quant.kernels import minmax as kmm  # noqa: E402
from mono_quant.kernels import minmax_one_launch as kol  # noqa: E402
from mono_quant.kernels._common import launch_options  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# triton 3.9 emits PTX 9.x, which only its newer bundled ptxas reads (the plain one is 8.8 there)
PTXAS = next(
    p for p in (os.path.join(_BIN, "ptxas-blackwell"), os.path.join(_BIN, "ptxas")) if os.path.exists(p)
)
P32, P64, PX = "*fp32", "*i64", "*bf16"


def _cases():
    part = {"x_ptr": PX, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "n": "i64", "num_tiles": "i32"}
    fin = {"pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "num_partials": "i32", "rmin_ptr": P32,
           "rmax_ptr": P32, "seen_ptr": P64, "n": "i64", "c": "fp32"}  # fmt: skip
    rows = {"x_ptr": PX, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "R": "i32", "C": "i32",
            "num_row_tiles": "i32"}  # fmt: skip
    inner = {"x_ptr": PX, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "C": "i32", "INNER": "i32",
             "tiles_per_row": "i32", "num_tiles": "i32"}  # fmt: skip
    cfin = {"pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "num_splits": "i32", "C": "i32",
            "rmin_ptr": P32, "rmax_ptr": P32, "seen_ptr": P64, "n": "i64", "c": "fp32"}  # fmt: skip
    hpass = {"x_ptr": PX, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "hist_ptr": P64,
             "exp_ptr": P64, "org_ptr": P64, "flag_ptr": "*i32", "n": "i64", "num_tiles": "i32",
             "num_bins": "i32"}  # fmt: skip
    hfin = {"pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "num_partials": "i32", "rmin_ptr": P32,
            "rmax_ptr": P32, "seen_ptr": P64, "exp_ptr": P64, "org_ptr": P64, "counts_ptr": P64,
            "delta_ptr": P64, "flag_ptr": "*i32", "n": "i64", "num_bins": "i32"}  # fmt: skip
    yield "minmax_partial", kmm._partial_kernel, part, {"BLOCK": 4096}, 8
    yield "minmax_finalize", kmm._finalize_kernel, fin, {"BLOCK_P": 2048, "EMA": True}, 4
    yield "rows_partial", kmm._rows_partial_kernel, rows, {"BLOCK_R": 32, "BLOCK_C": 128}, 8
    yield (
        "inner_partial",
        kmm._inner_partial_kernel,
        inner,
        {"BLOCK_C": 1, "BLOCK_I": 4096},
        8,
    )
    cconsts = {"BLOCK_S": 16, "BLOCK_C": 128, "EMA": True}
    yield "channel_finalize", kmm._channel_finalize_kernel, cfin, cconsts, 4
    for strat in ("atomic", "tl_histogram"):  # the pass kernel's binnings; 4098 bins held (2048 user bins)
        for fused in (True, False):
            consts = {"BLOCK": khist.BLOCK, "NB": 8192, "FUSED": fused, "STRATEGY": strat}
            yield f"hist_pass_{strat}_{'fused' if fused else 'rebin'}", khist._pass_kernel, hpass, consts, 8
    hbins = {"x_ptr": PX, "out_ptr": P32, "exp_ptr": P64, "org_ptr": P64, "start": "i64", "m": "i32",
             "num_bins": "i32"}  # fmt: skip
    yield "hist_bin_numbers", khist._bin_numbers_kernel, hbins, {"BLOCK": khist.BLOCK}, 8
    hconsts = {"BLOCK_P": 2048, "BLOCK_B": 1024, "E_LO": khist.E_MIN, "E_HI": khist.E_MAX}
    yield "hist_finalize", khist._finalize_kernel, hfin, hconsts, 4
    yield from _one_launch_cases()


def _aligned(sig: dict, *ints: str) -> dict:
    """The ``attrs`` of a launch on 16-byte aligned tensors: every pointer, and the integers ``ints``,
    divisible by 16, as the JIT specializes them (without it the compile shows scalar loads that no
    aligned launch runs)."""
    return {
        (i,): [["tt.divisibility", 16]] for i, (k, t) in enumerate(sig.items()) if t[0] == "*" or k in ints
    }


def _one_launch_cases():
    """The one-launch MinMax kernels (opt-in), each with what its PTX must hold: NaN-propagating min/max in
    the hot loop, 16-byte loads, the acquire-release ticket and the partials read through L2."""
    state = {"rmin_ptr": P32, "rmax_ptr": P32, "seen_ptr": P64}
    needles = ("max.NaN.f32", "min.NaN.f32", "atom.global.gpu.acq_rel.add", "ld.global.cg", ".v4.b32")
    for dtype, elem in (("*fp32", 4), ("*bf16", 2)):
        sig = {"x_ptr": dtype, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "ticket_ptr": "*i32",
               **state, "n": "i64", "c": "fp32"}  # fmt: skip
        block = kol.block_for(elem)
        consts = {"BLOCK": block, "UNROLL": kol.UNROLL, "BLOCK_P": 1024, "EMA": True}
        yield (
            f"one_launch_{dtype[1:]}",
            kol._one_launch_kernel,
            sig,
            consts,
            kol.NUM_WARPS,
            _aligned(sig),
            needles,
        )
    part = {"x_ptr": PX, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "tickets_ptr": "*i32", **state}
    rows = dict(part, R="i32", C="i32", n="i64", c="fp32")
    consts = {"BLOCK_R": kol.TILE // 128, "BLOCK_C": 128, "UNROLL": kol.ROW_UNROLL,
              "BLOCK_S": kol.FINALIZE_SPLITS, "EVEN_C": True, "EMA": True}  # fmt: skip
    yield (
        "one_launch_rows",
        kol._rows_one_launch_kernel,
        rows,
        consts,
        kol.NUM_WARPS,
        _aligned(rows, "C"),
        needles,
    )
    inner = dict(part, C="i32", INNER="i32", tiles_per_row="i32", num_tiles="i32", n="i64", c="fp32")
    consts = {"BLOCK_C": kol.TILE // 512, "BLOCK_I": 512, "BLOCK_S": kol.FINALIZE_SPLITS, "EVEN": True,
              "EMA": True}  # fmt: skip
    yield (
        "one_launch_inner",
        kol._inner_one_launch_kernel,
        inner,
        consts,
        kol.NUM_WARPS,
        _aligned(inner),
        needles,
    )


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    spilled = False
    for name, fn, sig, consts, warps, *aligned in _cases():
        attrs, needles = aligned or ({}, ())
        sig = dict(sig, **{k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=target, options=launch_options(warps))
        if "fma." in kernel.asm["ptx"]:
            print(f"{name}: launched without FP fusion (launch_options), yet its PTX holds an FMA")
            spilled = True
        for needle in needles:  # the instructions its design relies on
            if needle not in kernel.asm["ptx"]:
                print(f"{name}: its PTX holds no {needle}")
                spilled = True
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
        os.unlink(f.name)
        log = out.stderr + out.stdout
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        spilled |= any(spills)
        nregs = regs.group(1) if regs else "?"
        print(f"{name:32} regs={nregs:>4} spill_bytes={sum(spills):>6} ptxas_rc={out.returncode}")
        spilled |= out.returncode != 0
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
