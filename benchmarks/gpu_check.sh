#!/usr/bin/env bash
# One-command GPU validation (DESIGN.md, "The GPU validation script"): at most 9 minutes on an H200 (the
# step limits below), plus 1 to 5 minutes for the machine to start: one run fits a 15-minute device budget.
#   1. installs the package (kernels/ becomes mono_quant.kernels only through the install; a copy on
#      PYTHONPATH if pip cannot install here);
#   2. runs the gpu-marked tests with compiled kernels: CUDA vs torch equality, > 2**31 elements, sync-free
#      forward (set_sync_debug_mode("error")), CUDA-graph replay, torch.compile(fullgraph=True);
#   3. runs the pytest-benchmark suite (profile gpu, short rounds) into $OUT/suite.{json,md,png};
#   4. benchmarks 1e4..1e9 elements, fp32/bf16, with triton.testing.do_bench, against the torch path,
#      torch.ao and the measured read/copy ceilings, the histogram with the default binning (histc) and
#      atomic: $OUT/gpu_bench.json; then at 1e8 and 1e9 on LLM-like activations (most values in a few
#      histogram bins) with every candidate binning: $OUT/gpu_bench-llm.json.
# STEPS (default "tests suite bench llm") picks the steps of a rerun; BENCH_ARGS adds gpu_bench options.
# Each step has its own time limit (a step cut at its limit is reported, the next one still runs; the
# suite writes its JSON only when it finishes: 160 s on the H200). Logs: $OUT/*.log.
# Keep the results: copy them to benchmarks/results/<date>-gpu-<gpu name>.* and commit them.
# CPU-only check of the benchmark logic: python3 benchmarks/gpu_bench.py --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/results/latest}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # tests/conftest.py would otherwise turn the interpreter on
T_TESTS="${T_TESTS:-120}" T_SUITE="${T_SUITE:-200}" T_BENCH="${T_BENCH:-120}" T_LLM="${T_LLM:-75}"
STEPS="${STEPS:-tests suite bench llm}"  # a rerun can take only some, e.g. STEPS=suite
BENCH_ARGS="${BENCH_ARGS:-}"  # more gpu_bench.py options for the bench step, e.g. --dtypes bfloat16
has() { [[ " $STEPS " == *" $1 "* ]]; }

if ! python3 -m pip install --no-deps --no-build-isolation -q -e .; then
    site=$(mktemp -d)
    cp -r mono_quant "$site/" && cp -r kernels "$site/mono_quant/kernels" || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: pip install failed; using a copy on PYTHONPATH ($site)"
fi
python3 -c "import torch, triton, mono_quant.kernels; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv || true

status=0
step() {  # step NAME: report a failed or timed-out step and go on
    local rc=$1 name=$2
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "gpu_check: $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
    fi
}

if has tests; then
    timeout "$T_TESTS" python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rfE --durations=5 \
        >"$OUT/gpu_tests.log" 2>&1
    step $? "gpu tests"
    tail -30 "$OUT/gpu_tests.log"
fi

if has suite; then
    timeout "$T_SUITE" python3 -m pytest benchmarks/ --bench-profile gpu -q -p no:cacheprovider \
        --benchmark-json="$OUT/suite.json" --benchmark-max-time=0.05 --benchmark-min-rounds=5 \
        --benchmark-columns=median,rounds >"$OUT/suite.log" 2>&1
    step $? "benchmark suite"
    tail -4 "$OUT/suite.log"
    if [ -s "$OUT/suite.json" ]; then
        python3 benchmarks/report.py "$OUT/suite.json" --md "$OUT/suite.md" --plot "$OUT/suite.png" \
            --title "$(date +%F), $(python3 -c 'import torch; print(torch.cuda.get_device_name())')" \
            >>"$OUT/suite.log" 2>&1
        step $? "report.py"
    fi
fi

if has bench; then
    # shellcheck disable=SC2086
    timeout "$T_BENCH" python3 benchmarks/gpu_bench.py --strategies default,atomic $BENCH_ARGS --out "$OUT" \
        >>"$OUT/gpu_bench.log" 2>&1
    step $? "gpu_bench.py"
fi
if has llm; then
    timeout "$T_LLM" python3 benchmarks/gpu_bench.py --data llm --sizes 1e8,1e9 --out "$OUT" \
        >>"$OUT/gpu_bench.log" 2>&1
    step $? "gpu_bench.py --data llm"
fi

[ -f "$OUT/gpu_bench.log" ] && tail -75 "$OUT/gpu_bench.log"
echo "gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED); results in $OUT"
exit $status
