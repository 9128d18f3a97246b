#!/usr/bin/env bash
# The one script for a lent GPU machine (torch, triton, scipy, pytest, pytest-benchmark and ninja
# are preinstalled there; nothing can be downloaded): say what the machine has, build _C for the
# card, run every test that exercises CUDA, then the benchmarks. It writes one markdown summary
# (summary.md) and the benchmark JSON (gpu.json, with gpu.md) to $OUT (the device tool's output
# folder; benchmarks/results/gpu by default). Each section has a time limit, so the whole run ends
# within 10 minutes on one H200, build included; a section that runs out is reported as such.
#
#     bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTMASKFORMER_CUDA=1
unset TRITON_INTERPRET
START=$(date +%s)

section() {  # section NAME LIMIT_S LOG COMMAND...: run it under a time limit, record the outcome
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s) rc
  timeout "$limit" "$@" >"$log" 2>&1; rc=$?
  local verdict="ok"; [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit}s"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (exit $rc)"
  local tail_line; tail_line=$(grep -E "passed|failed|error" "$log" | tail -n 1)
  printf '| %s | %s | %ss | %s |\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "${tail_line:--}" >>"$SUMMARY"
  echo "== $name: $verdict ($(( $(date +%s) - t0 ))s) ${tail_line}"
  return $rc
}

{
  echo "# GPU run: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  python3 - <<'PY' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "scipy", "numpy", "timm", "pytest", "pytest_benchmark", "ninja", "lapjv",
             "transformers", "pycocotools"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "missing", f"({type(exc).__name__})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")
PY
  echo '```'
} | tee "$SUMMARY"

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "No CUDA device here: nothing to run (this script is for a lent GPU machine)." | tee -a "$SUMMARY"
  exit 0
fi

printf '\n| section | result | time | last line |\n|---|---|---:|---|\n' >>"$SUMMARY"

section "install (pip -e, no deps)" 120 "$OUT/install.log" pip install --no-build-isolation --no-deps -e .
section "build _C (sm_${TORCH_CUDA_ARCH_LIST/./})" 240 "$OUT/build.log" python3 setup.py build_ext --inplace \
  || { tail -40 "$OUT/build.log"; exit 1; }

# Parity of every CUDA backend with the reference (each op test parametrizes over conftest.DEVICES,
# which includes cuda here), the fused-vs-reference model step in fp32 and under fp16/bf16
# autocast, the one-sync-per-step test under set_sync_debug_mode("error"), fullgraph compiles of
# the Triton ops and of the fused models, and every autotune config against the reference.
CUDA_TESTS="tests/test_ext.py tests/test_mask_loss.py tests/test_mask_logits.py tests/test_semantic_inference.py
  tests/test_matching_cost.py tests/test_native_ops.py tests/test_linear_sum_assignment.py tests/test_metrics.py
  tests/test_ms_deform_attn_backends.py tests/test_fused_equivalence.py tests/test_autocast.py tests/test_sync.py
  tests/test_compile.py tests/test_autotune_configs.py tests/test_point_mask_loss.py
  tests/test_point_matching_cost.py tests/test_point_uncertainty.py"
section "CUDA tests" 200 "$OUT/tests.log" python3 -m pytest -q -rs --deselect \
  tests/test_compile.py::test_models_compile_without_graph_breaks_in_a_fresh_process $CUDA_TESTS
# The same parity with TF32 matmuls, as most training runs set them (tolerances.py loosens fp32).
section "CUDA parity, matmul precision high" 60 "$OUT/tests_tf32.log" env FMF_MATMUL_PRECISION=high \
  python3 -m pytest -q -k cuda tests/test_mask_loss.py tests/test_mask_logits.py tests/test_semantic_inference.py \
  tests/test_fused_equivalence.py

REMAIN=$(( 570 - ($(date +%s) - START) ))
[ $REMAIN -lt 60 ] && REMAIN=60
section "benchmarks" "$REMAIN" "$OUT/bench.log" python3 -m pytest -q benchmarks/test_bench_mask_loss.py \
  benchmarks/test_bench_mask_logits.py benchmarks/test_bench_semantic_inference.py \
  benchmarks/test_bench_matching_cost.py benchmarks/test_bench_linear_sum_assignment.py \
  benchmarks/test_bench_ms_deform_attn.py benchmarks/test_bench_train_step.py \
  benchmarks/test_bench_point_mask_loss.py \
  benchmarks/test_bench_point_matching_cost.py benchmarks/test_bench_point_uncertainty.py \
  --benchmark-only --benchmark-json="$OUT/gpu.json"

{
  echo
  echo "Total: $(( $(date +%s) - START ))s. Failures and skips:"
  echo '```'
  grep -hE "^(FAILED|ERROR|SKIPPED)" "$OUT"/tests*.log | head -40
  echo '```'
} >>"$SUMMARY"
if [ -s "$OUT/gpu.json" ]; then
  python3 benchmarks/report.py "$OUT/gpu.json" -o "$OUT/gpu.md" && { echo; cat "$OUT/gpu.md"; } >>"$SUMMARY"
fi
cat "$SUMMARY"
