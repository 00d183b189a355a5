#!/usr/bin/env bash
# One-command GPU validation (DESIGN.md, "The GPU validation script"): gates first, measures second, at
# most 8 minutes on an H200 (the sum of the step limits below; about 5 expected), plus 1 to 5 minutes for
# the machine to start: one run fits a 15-minute device budget.
#   0. installs the package (kernels/ becomes mono_quant.kernels only through the install; a copy on
#      PYTHONPATH if pip cannot install here), and the wheels in $WHEELS (default .whl, e.g. ModelOpt's:
#      benchmarks/README.md) into /tmp/site when that folder holds any;
#   1. gate (T_GATE): benchmarks/gpu_gate.py, every kernel, default and opt-in (MinMax kernels with and
#      without the fast launch, every histogram binning in HIST_STRATEGIES, the segmented MoE kernels), on
#      CUDA against the torch path, bit for bit, one process per kernel, 8 at a time (compiling is
#      CPU-bound): $OUT/gate.json;
#   2. tests (T_TESTS): every gpu-marked test under tests/ (CUDA vs torch, > 2**31 elements, sync-free
#      forward, CUDA-graph replay, torch.compile), on several processes when pytest-xdist is there, each
#      test under a time limit when pytest-timeout is: $OUT/gpu_tests.log;
#   3. bench (T_BENCH): benchmarks/gpu_bench.py at 1e8 and 1e9 values, fp32 and bf16, every MinMax kernel
#      and histogram candidate beside x.sum(), x.clone(), torch.ao and ModelOpt (when it imports), 200
#      layers [2048, 4096] one step each, the host time of a 1e4-value update: $OUT/gpu_bench.json;
#   4. llm (T_LLM): the same at 1e8 on LLM-like activations (concentrated histograms):
#      $OUT/gpu_bench-llm.json;
#   5. summary: issue 11's rows, printed last and written to $OUT/gpu_check.md.
# Optional steps (STEPS="... suite probes calib"): the pytest-benchmark suite (T_SUITE; $OUT/suite.{json,md}),
# the probes of gpu_bench.py (programs per SM, torch.histc alone, the launcher alone) at 1e8 and 1e9, and
# calib: llm_calibration.py --h200 (T_CALIB; $OUT/llm_calibration.json; a Llama-like model of 8 layers,
# hidden 4096, 4 x 2048 tokens, bf16, without transformers if it is absent), group_calls.py (T_GROUP;
# into the log) and segments_bench.py (T_SEGMENTS; segmented MoE observers against one observer per expert,
# [16384, 4096] bf16, 8 experts top-2 and 64 top-8; into the log).
# Everything else each step prints goes to $OUT/gpu_check.log. At most 8 files land in $OUT (the device
# tool brings back 8). STEPS picks the steps of a rerun (default "gate tests bench llm summary"); a step
# cut at its limit is reported and the next one still runs. BENCH_ARGS adds gpu_bench.py options.
# SMOKE=1: the same Python on this machine's CPU at tiny sizes under the Triton interpreter (no install;
# the gpu tests skip), to check the script without a GPU.
# Keep the results: copy them to benchmarks/results/<date>-gpu-<gpu name>.* and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/results/latest}"
mkdir -p "$OUT"
SMOKE="${SMOKE:-0}"
x=1 && [ "$SMOKE" = 1 ] && x=10  # the interpreter on 2 CPU cores: the H200's limits times ten
T_GATE="${T_GATE:-$((90 * x))}" T_TESTS="${T_TESTS:-$((150 * x))}" T_BENCH="${T_BENCH:-$((150 * x))}"
T_LLM="${T_LLM:-$((60 * x))}" T_SUITE="${T_SUITE:-$((200 * x))}" T_CALIB="${T_CALIB:-$((240 * x))}"
T_GROUP="${T_GROUP:-$((60 * x))}" T_SEGMENTS="${T_SEGMENTS:-$((120 * x))}"
STEPS="${STEPS:-gate tests bench llm summary}"
BENCH_ARGS="${BENCH_ARGS:-}"
WHEELS="${WHEELS:-.whl}"
LOG="$OUT/gpu_check.log"
: >"$LOG"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    SM=(--smoke) SIZES=4096 LLM_SIZES=4400 JOBS=2
else
    export TRITON_INTERPRET=0  # tests/conftest.py would otherwise turn the interpreter on
    SM=() SIZES=1e8,1e9 LLM_SIZES=1e8 JOBS=8
fi
export PYTHONUNBUFFERED=1

if [ "$SMOKE" != 1 ]; then
    if ! python3 -m pip install --no-deps --no-build-isolation -q -e . >>"$LOG" 2>&1; then
        site=$(mktemp -d)
        cp -r mono_quant "$site/" && cp -r kernels "$site/mono_quant/kernels" || exit 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: pip install failed; using a copy on PYTHONPATH ($site)"
    fi
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        else
            echo "gpu_check: the wheels in $WHEELS did not install (see gpu_check.log); ModelOpt is not timed"
        fi
    fi
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
        --format=csv 2>&1 | tee -a "$LOG"
fi
python3 -c "import torch, triton, mono_quant.kernels; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" || exit 1

status=0
step() {  # step NAME LIMIT CMD...: run CMD under LIMIT seconds, output to the log; report failure, go on
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "gpu_check: $name $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))") in $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
}

if has gate; then
    step gate "$T_GATE" python3 benchmarks/gpu_gate.py "${SM[@]}" --jobs "$JOBS" --out "$OUT"
    grep -E "^(gate|FAIL)" "$LOG" | tail -20
fi

if has tests; then
    par=() per=()
    if python3 -c "import xdist" 2>/dev/null && [ "$SMOKE" != 1 ]; then par=(-n 8); fi  # compiling is CPU-bound
    if python3 -c "import pytest_timeout" 2>/dev/null; then per=(--timeout 100); fi  # a hang costs one test
    timeout "$T_TESTS" python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rfEs --durations=15 \
        "${par[@]}" "${per[@]}" >"$OUT/gpu_tests.log" 2>&1
    rc=$?
    [ $rc -eq 5 ] && [ "$SMOKE" = 1 ] && rc=0  # no GPU: every gpu test skipped
    echo "gpu_check: gpu tests $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)"): $(tail -1 "$OUT/gpu_tests.log")"
    [ $rc -eq 0 ] || status=1
fi

if has suite; then
    step suite "$T_SUITE" python3 -m pytest benchmarks/ --bench-profile "$([ "$SMOKE" = 1 ] && echo tiny || echo gpu)" \
        -q -p no:cacheprovider --benchmark-json="$OUT/suite.json" --benchmark-max-time=0.05 \
        --benchmark-min-rounds=5 --benchmark-columns=median,rounds
    [ -s "$OUT/suite.json" ] && step report 60 python3 benchmarks/report.py "$OUT/suite.json" --md "$OUT/suite.md"
fi

if has bench; then
    # shellcheck disable=SC2086
    step bench "$T_BENCH" python3 benchmarks/gpu_bench.py "${SM[@]}" --sizes "$SIZES" --no-probes \
        --extra layers,host $BENCH_ARGS --out "$OUT"
fi
if has llm; then
    step llm "$T_LLM" python3 benchmarks/gpu_bench.py "${SM[@]}" --data llm --sizes "$LLM_SIZES" --no-probes \
        --out "$OUT"
fi
if has calib; then  # optional: benchmarks/llm_calibration.py (its --h200 profile) and group_calls.py
    if [ "$SMOKE" = 1 ]; then
        CALIB=(--device cpu --dtype float32 --layers 1 --hidden 64 --tokens 16 --batches 2 --vocab 128 --rounds 1
               --no-modelopt) GROUP=(--device cpu --min-seconds 0.05 --layers 1 --hidden 64)
        SEGMENTS=(--device cpu --min-seconds 0.05 --tokens 64 --hidden 32 --configs 4x2)
    else
        CALIB=(--h200) GROUP=(--device cuda)
        SEGMENTS=(--device cuda --min-seconds 0.5 --tokens 16384 --hidden 4096 --dtype bfloat16 --configs 8x2,64x8)
    fi
    step calib "$T_CALIB" python3 benchmarks/llm_calibration.py "${CALIB[@]}" --json "$OUT/llm_calibration.json"
    step group "$T_GROUP" python3 benchmarks/group_calls.py "${GROUP[@]}"
    step segments "$T_SEGMENTS" python3 benchmarks/segments_bench.py "${SEGMENTS[@]}"
fi
if has probes; then  # into gpu_check.log only (no JSON: the 8 files are taken)
    step probes "$T_BENCH" python3 benchmarks/gpu_bench.py "${SM[@]}" --sizes "$SIZES" --probes-only \
        --out "$(mktemp -d)"
fi

if has summary; then
    python3 benchmarks/gpu_bench.py --summary "$OUT" 2>&1 | tee -a "$LOG"
fi
echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); results in $OUT ($(ls "$OUT" | wc -l) files)"
exit $status
