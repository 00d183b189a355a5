#!/usr/bin/env bash
# One-command GPU validation (DESIGN.md, "The GPU validation script"); about 5 minutes on an H200.
#   1. installs the package (kernels/ becomes mono_quant.kernels only through the install);
#   2. runs the gpu-marked tests with compiled kernels: CUDA vs torch equality, > 2**31 elements, sync-free
#      forward (set_sync_debug_mode("error")), CUDA-graph replay, torch.compile(fullgraph=True);
#   3. benchmarks 1e4..1e9 elements, fp32/bf16, against the torch path, torch.ao and the measured
#      read/copy ceilings; prints the table last and writes $OUT/gpu_bench.json (+ the pytest log).
# Copy $OUT/gpu_bench.json to benchmarks/results/<date>_<machine>.json and commit it.
# CPU-only check of the benchmark logic: python3 benchmarks/gpu_bench.py --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/results/latest}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0  # tests/conftest.py would otherwise turn the interpreter on

python3 -m pip install --no-deps --no-build-isolation -q -e . || exit 1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

status=0
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -x -p no:randomly 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 150 python3 benchmarks/gpu_bench.py --out "$OUT" || status=1
echo "gpu_check: tests and benchmarks $([ $status -eq 0 ] && echo passed || echo FAILED); results in $OUT"
exit $status
