#!/usr/bin/env bash
# Everything the CUDA fused attention needs checked on a GPU, in one device
# call (aim: under 10 minutes on an H200). Logs go to $OUT (or ./gpu_logs).
#   1. build (sm_90a) unless SKIP_BUILD=1 (then python/cogkern/_C*.so must be carried)
#   2. compute-sanitizer memcheck + racecheck on one fwd+bwd per kernel path (small shapes)
#   3. scripts/attention_cuda_check.py: error rule sweep, determinism, NaN, layouts,
#      CUDA graphs, 5B shape, timings against the SDPA backends
#   4. pytest -m cuda (tests/test_attention_cuda.py and the rest)
#   5. benchmarks/bench_attention.py --quick
# Usage on the device machine: bash scripts/attention_gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONPATH=python:tests
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"

step() { echo; echo "=== $1 ($(date +%T))"; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step build
  JOBS=${JOBS:-16} COGKERN_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0a scripts/dev_build.sh >"$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
  tail -1 "$out/build.log"
fi
python -c "import cogkern; print(cogkern.build_info())" || exit 1

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  step "compute-sanitizer memcheck (quick)"
  timeout 240 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 9 \
    python scripts/attention_sanitize_case.py --quick >"$out/memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|all finite|NON-FINITE" "$out/memcheck.log" | head -20
  step "compute-sanitizer racecheck (one case per path)"
  timeout 180 "$sanitizer" --tool racecheck --error-exitcode 9 \
    python scripts/attention_sanitize_case.py --quick >"$out/racecheck.log" 2>&1
  echo "racecheck rc=$?"; grep -E "ERROR SUMMARY|hazard|all finite" "$out/racecheck.log" | head -20
else
  echo "no compute-sanitizer"
fi

step "attention_cuda_check.py"
timeout 300 python scripts/attention_cuda_check.py 2>&1 | tee "$out/check.log" | grep -E "^FAIL|^time|failed|raised" 

step "pytest -m cuda"
timeout 300 python -m pytest tests -q -m cuda -x -p no:cacheprovider 2>&1 | tee "$out/pytest_cuda.log" | tail -15

step "benchmark"
timeout 240 python benchmarks/bench_attention.py --device cuda --quick 2>&1 | tee "$out/bench.log" | tail -30
