#!/usr/bin/env bash
# Run the whole benchmark suite on this machine and keep its results under benchmarks/results/,
# named with the date and the machine: <date>-cpu-<N>core-<cpu model>.{json,md,png}
# (or <date>-gpu-<gpu name>.*; -<N>thread appended when MONO_QUANT_BENCH_THREADS=N sets torch's thread
# count). Extra arguments go to pytest, e.g. `-k "not python"`.
set -euo pipefail
cd "$(dirname "$0")/.."
slug() { tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' | sed 's/^-*//; s/-*$//'; }
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")')
if [ -n "$gpu" ]; then
    machine="gpu-$(echo "$gpu" | slug)"
else
    model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || uname -m)
    machine="cpu-$(nproc)core-$(echo "$model" | slug)"
fi
if [ -n "${MONO_QUANT_BENCH_THREADS:-}" ]; then machine="$machine-${MONO_QUANT_BENCH_THREADS}thread"; fi
name="benchmarks/results/$(date +%F)-$machine"
python3 -m pytest benchmarks/ -q --benchmark-json="$name.json" --benchmark-columns=median,iqr,rounds "$@"
python3 benchmarks/report.py "$name.json" --md "$name.md" --plot "$name.png" --title "$(date +%F), $machine"
echo "wrote $name.json, $name.md, $name.png"
