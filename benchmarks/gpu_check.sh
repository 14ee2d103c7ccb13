#!/usr/bin/env bash
# Everything a GPU session runs, in one call (device time is scarce): the tests natively on the GPU, then the
# backend benchmark. Results land in $OUT when set (the device tool's output folder), else in benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pip install -q --no-deps -e . -e examples/llmcompress-example-pass 2>&1 | tail -2
python -m pytest -q -x tests/kernels tests/models -k "cuda or rms_norm" 2>&1 | tee "$out/gpu_tests.log" | tail -15
llmcompress calibrate 2>&1 | tail -20
cp llmcompress/analysis/profiles/*.json "$out/" 2>/dev/null
python benchmarks/validate_cost_model.py --workloads decode --out "$out/cost_model_decode.json" 2>&1 | tail -20
python benchmarks/run_backend.py --workloads forward --out "$out/backend_forward.json" 2>&1 | tail -20
python benchmarks/run_backend.py --workloads generate --out "$out/backend_generate.json" 2>&1 | tail -20
