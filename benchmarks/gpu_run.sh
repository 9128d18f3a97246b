#!/usr/bin/env bash
# The one script for a lent GPU machine (torch, triton, scipy, pytest, pytest-benchmark and ninja
# are preinstalled there; nothing can be downloaded): build _C for the card, run every test that
# exercises CUDA (parity of each backend with the reference, compile checks), then the benchmarks.
# Results land in $OUT (the device tool's output folder) or benchmarks/results/gpu.
#
#     bash benchmarks/gpu_run.sh            # ~6-8 minutes on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTMASKFORMER_CUDA=1
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/machine.txt"

pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }

# Every op test parametrizes over tests/conftest.DEVICES, which includes cuda here.
python3 -m pytest -q -rs tests/test_ext.py tests/test_mask_loss.py tests/test_mask_logits.py \
  tests/test_semantic_inference.py tests/test_matching_cost.py tests/test_native_ops.py \
  tests/test_linear_sum_assignment.py tests/test_metrics.py 2>&1 | tee "$OUT/tests.txt" | tail -25

python3 -m pytest -q benchmarks/test_bench_mask_loss.py benchmarks/test_bench_mask_logits.py \
  benchmarks/test_bench_semantic_inference.py benchmarks/test_bench_matching_cost.py \
  benchmarks/test_bench_linear_sum_assignment.py benchmarks/test_bench_train_step.py \
  --benchmark-only --benchmark-json="$OUT/gpu.json" >"$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"
python3 benchmarks/report.py "$OUT/gpu.json" -o "$OUT/gpu.md" && cat "$OUT/gpu.md"
