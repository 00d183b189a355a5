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
from mono_quant.kernels import _binning as kbin  # noqa: E402
from mono_quant.kernels import _smem as kbin_smem  # noqa: E402
from mono_quant.kernels import amax as kamax  # noqa: E402
from mono_quant.kernels import blocks as kb  # noqa: E402
from mono_quant.kernels import fake_quant as kfq  # noqa: E402
from mono_quant.kernels import group_minmax as kgroup  # noqa: E402
from mono_quant.kernels import histogram as khist  # noqa: E402
from mono_quant.kernels import minmax as kmm  # noqa: E402
from mono_quant.kernels import minmax_one_launch as kol  # noqa: E402
from mono_quant.kernels import segment_histogram as ksh  # noqa: E402
from mono_quant.kernels import segments as ks  # noqa: E402
from mono_quant.kernels._common import launch_options  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# triton 3.9 emits PTX 9.x, which only its newer bundled ptxas reads (the plain one is 8.8 there)
PTXAS = next(
    p for p in (os.path.join(_BIN, "ptxas-blackwell"), os.path.join(_BIN, "ptxas")) if os.path.exists(p)
)
P32, P64, PX = "*fp32", "*i64", "*bf16"
# the token-mask arguments (issue 15) of every kernel that reads a mask, and their off / on constexprs
MASK_ARGS = {"keep_ptr": "*u8", "keep_div": "i64", "num_keep": "i32", "masked": "i64"}
MASK_OFF = {"HAS_MASK": False, "MASK": 0}


def _complete(fn, sig: dict, consts: dict) -> tuple[dict, dict]:
    """``sig`` and ``consts`` with the token-mask arguments ``fn`` takes (off unless ``consts`` says), in
    ``fn``'s argument order."""
    consts = {**{k: v for k, v in MASK_OFF.items() if k in fn.arg_names}, **consts}
    full = {**MASK_ARGS, **sig, **{k: "constexpr" for k in consts}}
    return {k: full[k] for k in fn.arg_names if k in full}, consts


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
    # the masked variants of the hot loops (a token mask read beside x)
    yield "minmax_partial_masked", kmm._partial_kernel, part, {"BLOCK": 4096, "HAS_MASK": True}, 8
    yield "rows_partial_masked", kmm._rows_partial_kernel, rows, {"BLOCK_R": 32, "BLOCK_C": 128, "MASK": 1}, 8
    yield from _segment_cases()
    yield from _one_launch_cases()
    # ObserverGroup: pointers loaded from an int64 table and cast in the kernel
    table = {"table_ptr": P64, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64}
    yield "group_partial", kgroup._group_partial_kernel, {**table, "T": "i32", "W": "i32"}, \
        {"BLOCK": kgroup.BLOCK, "LOG_T": 8}, 8  # fmt: skip
    yield "group_finalize", kgroup._group_finalize_kernel, {**table, "W": "i32"}, {"BLOCK_P": 1024}, 4
    yield from _training_cases()
    yield from block_cases()


# ---- the histogram kernels: compiled as launched (pointers 16-byte aligned), with instruction checks ----

CUOBJDUMP = os.path.join(_BIN, "cuobjdump")
HIST_BINS = 4098  # internal bins of the default 2048 user bins
SHARED_ATOMIC = re.compile(r"ATOMS\.POPC\.INC\S*|ATOMS\.ADD\S*")


def _hist_cases():
    """(name, kernel, signature, constexprs, warps, tile bodies that count in shared memory or None,
    whether a problem in that counting fails the check: it does for our PTX, it is reported for Triton's
    own tl.histogram lowering)."""
    nbs = khist.counter_slots(HIST_BINS)
    tl_histogram_shared = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 8)
    for counters, rows, dtype in (("ptx", True, PX), ("ptx", True, P32), ("ptx", False, PX),
                                  ("tl_histogram", False, PX), ("global", False, PX)):  # fmt: skip
        consts = dict(
            BLOCK=khist.PASS_BLOCK, NBS=nbs, SIDE=khist.SIDE, COUNTERS=counters, ROWS=rows,
            NBP=triton.next_power_of_2(nbs) if counters == "tl_histogram" else 1,
            DECL=kbin_smem.ptx_declaration(nbs) if counters == "ptx" else "",
        )  # fmt: skip
        common = {"x_ptr": dtype, "side_ptr": "*i32", "side_n_ptr": "*i32", "cnt_ptr": "*i32",
                  "out_ptr": "*i32" if rows else P64, "exp_ptr": P64, "org_ptr": P64}  # fmt: skip
        sizes = {"n": "i64", "num_full": "i32", "num_bins": "i32"}
        psig = {"x_ptr": dtype, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, **common, **sizes}
        osig = {**common, "old_grid_ptr": P64, **sizes}
        osig = {k: osig[k] for k in kbin._offgrid_kernel.arg_names if k in osig}
        shared = counters == "ptx" or (counters == "tl_histogram" and tl_histogram_shared)
        strict = counters == "ptx"
        tag = f"{counters}_{'rows' if rows else 'atomic'}_{dtype[1:]}"
        # tile bodies: the pass's full tiles and ragged last one; the off-grid kernel's noted tiles
        # (masked), all full tiles and the ragged one. Each counts every element once.
        yield f"hist_pass_{tag}", kbin._pass_kernel, psig, consts, 8, 2 if shared else None, strict
        if dtype == PX:
            yield f"hist_offgrid_{tag}", kbin._offgrid_kernel, osig, consts, 8, 3 if shared else None, strict
    rsig = {"rows_ptr": "*i32", "side_n_ptr": "*i32", "out_ptr": P64, "num_rows": "i32", "num_bins": "i32",
            "rows_per_split": "i32"}  # fmt: skip
    for gated in (False, True):
        consts = {"NBS": nbs, "GATED": gated, "BLOCK_R": 8, "BLOCK_C": 256}
        name = f"hist_rows_reduce{'_gated' if gated else ''}"
        yield name, kbin._rows_reduce_kernel, rsig, consts, 4, None, True
    hbins = {"x_ptr": PX, "out_ptr": P32, "exp_ptr": P64, "org_ptr": P64, "start": "i64", "m": "i32",
             "num_bins": "i32"}  # fmt: skip
    yield "hist_bin_numbers", khist._bin_numbers_kernel, hbins, {"BLOCK": khist.BLOCK}, 8, None, True
    hfin = {"pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "num_partials": "i32", "rmin_ptr": P32,
            "rmax_ptr": P32, "seen_ptr": P64, "exp_ptr": P64, "org_ptr": P64, "old_grid_ptr": P64,
            "counts_ptr": P64, "delta_ptr": P64, "n": "i64", "num_bins": "i32"}  # fmt: skip
    for block_b, warps in ((1024, 4), (4096, 8)):  # up to 2**16 bins, and beyond
        hconsts = {"BLOCK_P": 2048, "BLOCK_B": block_b, "E_LO": khist.E_MIN, "E_HI": khist.E_MAX,
                   "HAS_DELTA": True}  # fmt: skip
        yield f"hist_finalize_{block_b}", khist._finalize_kernel, hfin, hconsts, warps, None, True


def _sass_problems(sass: str, bodies: int | None, per_body: int) -> list[str]:
    """What is wrong with a kernel's counting in its SASS: a float CAS loop, the shared atomics missing or
    not one per element of each tile body (``bodies`` of ``per_body`` each), or a branch or a predicate
    on them (ptxas wraps predicated atomics in branches)."""
    problems = ["a float CAS loop (ATOMS.CAST.SPIN)"] if "ATOMS.CAST.SPIN" in sass else []
    if bodies is None:
        return problems
    body = sass.splitlines()
    idx = [i for i, ln in enumerate(body) if SHARED_ATOMIC.search(ln)]
    if len(idx) != bodies * per_body:
        return [*problems, f"{len(idx)} shared atomics, expected {bodies} tile bodies x {per_body}"]
    for g in range(bodies):
        span = body[idx[g * per_body] : idx[(g + 1) * per_body - 1] + 1]
        if any(re.search(r"\b(BSSY|BRA|WARPSYNC)\b", ln) for ln in span):
            problems.append(f"a branch among the counting atomics of tile body {g}")
    if any(re.search(r"@!?U?P\d\s+ATOMS", body[i]) for i in idx):
        problems.append("a predicated shared atomic")
    return problems


def _check_histograms(target) -> bool:
    """Compile every histogram kernel as launched; report registers, spills, static shared memory and the
    counting instructions. Returns True when one spills, fails ptxas or counts wrongly."""
    failed = False
    print(f"histogram kernels, triton {triton.__version__}, counters on CUDA: {kbin_smem.COUNTERS_ON_GPU}")
    per_thread = khist.PASS_BLOCK // (32 * 8)  # a tile's elements per thread at 8 warps
    for name, fn, sig, consts, warps, bodies, strict in _hist_cases():
        sig, consts = _complete(fn, sig, consts)
        aligned = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(fn.arg_names) if sig[k][0] == "*"}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned)  # as torch allocates
        kernel = triton.compile(src, target=target, options=launch_options(warps))
        ptx = kernel.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
            with open(path, "w") as f:
                f.write(ptx)
            out = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", cubin],
                                 capture_output=True, text=True)  # fmt: skip
            sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True).stdout
        log = out.stderr + out.stdout
        regs = re.search(r"Used (\d+) registers", log)
        smem = re.search(r"(\d+) bytes smem", log)
        spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        problems = _sass_problems(sass, bodies, per_thread)
        if "fma." in ptx:
            problems.append("an FMA in the PTX (launched without FP fusion)")
        if spills or out.returncode:
            problems.append(f"spills {spills} bytes" if spills else f"ptxas failed: {log[-300:]}")
        # not strict: Triton's tl.histogram lowering (warp ballots before 3.8, which spill), reported only
        notes = [] if strict else sorted({p.split(" of tile body")[0] for p in problems})
        problems = problems if strict else []
        found = sorted(set(SHARED_ATOMIC.findall(sass))) + (["red.shared"] if "red.shared" in ptx else [])
        nregs, nsmem = regs.group(1) if regs else "?", smem.group(1) if smem else 0
        line = f"{name:38} regs={nregs:>4} static_smem={nsmem:>6} dynamic_smem={kernel.metadata.shared:>6}"
        line += f" {' '.join(found) or '-'}"
        print(line + "".join(f"  note: {p}" for p in notes) + "".join(f"  PROBLEM: {p}" for p in problems))
        failed |= bool(problems)
    return failed


def _training_cases():
    """The amax-history step and the fake-quantize kernels (``kernels/amax.py``, ``kernels/fake_quant.py``),
    for integer and FP8 targets; their divisions are ``tl.div_rn`` (Triton's ``/`` is approximate)."""
    hist = {"hist_ptr": P32, "scale_ptr": P32, "dscale_ptr": P32}
    amax = {"x_ptr": PX, "pmin_ptr": P32, "pmax_ptr": P32, "pbad_ptr": P64, "ticket_ptr": "*i32",
            "rmin_ptr": P32, "rmax_ptr": P32, "seen_ptr": P64, **hist, "n": "i64", "num_tiles": "i32",
            "hist_len": "i32", "mult": "fp32", "div": "fp32", "eps": "fp32"}  # fmt: skip
    for algo in (1, 2):
        consts = {"BLOCK": 4096, "BLOCK_P": 1024, "BLOCK_H": 1024, "ALGO": algo}
        yield f"amax_history_algo{algo}", kamax._amax_history_kernel, amax, consts, 8
    fq = {"x_ptr": PX, "out_ptr": PX, "mask_ptr": "*i1", "scale_ptr": P32, "zp_ptr": "*i32", "n": "i64",
          "C": "i32", "INNER": "i32", "qmin": "i32", "qmax": "i32"}  # fmt: skip
    for fp8 in (None, kfq.torch.float8_e4m3fn):
        for per_channel in (False, True):
            consts = {"BLOCK": 1024, "PER_CHANNEL": per_channel, "FP64": False, **kfq.fp8_constexprs(fp8)}
            tag = f"{'fp8' if fp8 else 'int'}_{'channel' if per_channel else 'tensor'}"
            yield f"fake_quant_{tag}", kfq._fake_quant_kernel, fq, consts, 4
    fq64 = dict(fq, x_ptr="*fp64", out_ptr="*fp64")
    consts = {"BLOCK": 1024, "PER_CHANNEL": False, "FP64": True, **kfq.fp8_constexprs(None)}
    yield "fake_quant_fp64", kfq._fake_quant_kernel, fq64, consts, 4
    ofq = {"x_ptr": PX, "out_ptr": PX, "mask_ptr": "*i1", "scale_ptr": P32, "zp_ptr": "*i32", "pmin_ptr": P32,
           "pmax_ptr": P32, "pbad_ptr": P64, "ticket_ptr": "*i32", "rmin_ptr": P32, "rmax_ptr": P32,
           "seen_ptr": P64, "hist_ptr": P32, "dscale_ptr": P32, "n": "i64", "num_tiles": "i32", "qmin": "i32",
           "qmax": "i32", "hist_len": "i32", "mult": "fp32", "div": "fp32", "eps": "fp32"}  # fmt: skip
    for history, fp8 in ((False, None), (True, kfq.torch.float8_e4m3fn)):
        consts = {"BLOCK": 2048, "FP64": False, "HISTORY": history, "BLOCK_P": 1024, "BLOCK_H": 1024,
                  "ALGO": 1, **kfq.fp8_constexprs(fp8)}  # fmt: skip
        yield (
            f"observe_fake_quant_{'history' if history else 'range'}",
            kfq._observe_fake_quant_kernel,
            ofq,
            consts,
            8,
        )


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


def _segment_cases():
    """The segmented kernels (MoE experts): min/max per tensor and per channel, plain and masked; the
    histogram's grid and binning kernels."""
    sig = {"x_ptr": PX, "seg_ptr": P64, "smin_ptr": P32, "smax_ptr": P32, "scnt_ptr": P64,
           "ticket_ptr": "*i32", "rmin_ptr": P32, "rmax_ptr": P32, "seen_ptr": P64, "tokens_ptr": P64,
           "invalid_ptr": P64, "N": "i32", "OUTER": "i32", "C": "i32", "INNER": "i32", "K": "i32", "E": "i32",
           "c": "fp32"}  # fmt: skip
    for tag, block_c, block_i in (("tensor", 1, ks.BLOCK), ("channels", 128, ks.BLOCK // 128)):
        for mask in (False, True):
            consts = {"BLOCK_C": block_c, "BLOCK_I": block_i, "BLOCK_F": 1024, "EMA": True, "HAS_MASK": mask}
            yield f"segments_{tag}{'_masked' if mask else ''}", ks._segments_kernel, sig, consts, 4
    # the segmented histogram: each segment's grid and counts moved, then the binning of the routed rows
    gsig = {"rmin_ptr": P32, "rmax_ptr": P32, "exp_ptr": P64, "org_ptr": P64, "counts_ptr": P64,
            "stage_ptr": P64, "num_bins": "i32"}  # fmt: skip
    for block_b, warps in ((1024, 4), (4096, 8)):
        consts = {"BLOCK_B": block_b, "E_LO": ksh.E_MIN, "E_HI": ksh.E_MAX}
        yield f"segment_hist_grid_{block_b}", ksh._grid_kernel, gsig, consts, warps
    bsig = {"x_ptr": PX, "seg_ptr": P64, "exp_ptr": P64, "org_ptr": P64, "counts_ptr": P64, "N": "i32",
            "INNER": "i32", "K": "i32", "E": "i32", "num_bins": "i32"}  # fmt: skip
    for mask in (False, True):
        consts = {"BLOCK": ksh.BLOCK, "HAS_MASK": mask}
        yield f"segment_hist_bin{'_masked' if mask else ''}", ksh._bin_kernel, bsig, consts, 8


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
        sig, consts = _complete(fn, sig, consts)
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
        print(f"{name:40} regs={nregs:>4} spill_bytes={sum(spills):>6} ptxas_rc={out.returncode}")
        spilled |= out.returncode != 0
    spilled |= _check_histograms(target)
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
