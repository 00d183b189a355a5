"""Compile the block-format kernels (``kernels/blocks.py``) for sm_90 without a GPU: registers, spills.

The same check as ``benchmarks/compile_sm90.py`` (``triton.compile`` of an ``ASTSource`` for
``GPUTarget("cuda", 90, 32)``, then triton's ``ptxas -v``), for the cases ``block_cases()`` lists: each
format's block size and scale rule, dynamic and given scales, bf16 input. Exits 1 if a kernel spills, fails
ptxas or holds an FMA. Run: ``python benchmarks/compile_blocks_sm90.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret

import triton  # noqa: E402
from mono_quant.kernels import blocks as kb  # noqa: E402
from mono_quant.kernels._common import launch_options  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = next(
    p for p in (os.path.join(_BIN, "ptxas-blackwell"), os.path.join(_BIN, "ptxas")) if os.path.exists(p)
)
P32, P64, PX = "*fp32", "*i64", "*bf16"
# (name, element mbits / emin / emax / max, rule, k, (1, k) rows or (k, k) tiles)
_FORMATS = (
    ("mxfp8_e4m3", (3, -6, 8, 448.0), "e8m0_floor", 32, "rows"),
    ("mxfp8_e5m2", (2, -14, 15, 57344.0), "e8m0_rceil", 32, "rows"),
    ("mxfp4_e2m1", (1, 0, 2, 6.0), "e8m0_floor", 32, "rows"),
    ("nvfp4", (1, 0, 2, 6.0), "nvfp4", 16, "rows"),
    ("fp8_block_1x128", (3, -6, 8, 448.0), "fp32", 128, "rows"),
    ("fp8_block_128x128", (3, -6, 8, 448.0), "fp32", 128, "tiles"),
)


def block_cases():
    """``(name, kernel, signature, constexprs, num_warps)`` of every block kernel variant launched."""
    rows = {"x_ptr": PX, "amax_ptr": P32, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "C": "i32",
            "CB": "i32", "blocks": "i64", "num_tiles": "i32"}  # fmt: skip
    tiles = {"x_ptr": PX, "amax_ptr": P32, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "R": "i32",
             "C": "i32", "CB": "i32", "num_tiles": "i32"}  # fmt: skip
    for k in (16, 32, 128):
        for even in (True, False):
            consts = {"K": k, "BLOCK_B": kb._rows_per_tile(k, 0 if even else 1), "EVEN": even}
            yield f"block_amax_rows_k{k}{'' if even else '_ragged'}", kb._amax_rows_kernel, rows, consts, 8
    yield "block_amax_tiles_k128", kb._amax_tiles_kernel, tiles, {"K": 128, "SUB": kb.TILE // 128}, 8
    fq_rows = {"x_ptr": PX, "y_ptr": PX, "s_ptr": "*u8", "t_ptr": P32, "C": "i32", "CB": "i32",
               "blocks": "i64", "num_tiles": "i32"}  # fmt: skip
    fq_tiles = {"x_ptr": PX, "y_ptr": PX, "s_ptr": P32, "t_ptr": P32, "R": "i32", "C": "i32", "CB": "i32",
                "num_tiles": "i32"}  # fmt: skip
    for name, (mbits, emin, emax, maxv), rule, k, kind in _FORMATS:
        for static in (False, True):
            consts = {"K": k, "RULE": kb.RULES[rule], "STATIC": static, "MBITS": mbits, "EMAX": emax,
                      "MAXV": maxv, "MIN_NORMAL": 2.0**emin, "MAGIC": 2.0 ** (emin - mbits + 23)}  # fmt: skip
            tag = f"block_fq_{name}_{'static' if static else 'dynamic'}"
            if kind == "rows":
                sig = dict(fq_rows, s_ptr=P32 if rule == "fp32" else "*u8")
                for even in (True, False):
                    rows_consts = {**consts, "BLOCK_B": kb._rows_per_tile(k, 0 if even else 1), "EVEN": even}
                    yield tag + ("" if even else "_ragged"), kb._fq_rows_kernel, sig, rows_consts, 8
            else:
                yield tag, kb._fq_tiles_kernel, fq_tiles, {**consts, "SUB": kb.TILE // k}, 8


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = False
    for name, fn, sig, consts, warps in block_cases():
        sig = dict(sig, **{k: "constexpr" for k in consts})
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                options=launch_options(warps))  # fmt: skip
        if "fma." in kernel.asm["ptx"]:
            print(f"{name}: launched without FP fusion (launch_options), yet its PTX holds an FMA")
            failed = True
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
        os.unlink(f.name)
        log = out.stderr + out.stdout
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        failed |= any(spills) or out.returncode != 0
        nregs = regs.group(1) if regs else "?"
        print(f"{name:40} regs={nregs:>4} spill_bytes={sum(spills):>6} ptxas_rc={out.returncode}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
