#!/usr/bin/env bash
# The one script for the GPU machine: build (no build isolation, sm_90a, ptxas
# register/spill report), all CUDA tests, compute-sanitizer memcheck + racecheck
# on small cases, the quick benchmarks, one Nsight Compute capture; logs and
# reports go to the output folder; a summary table is printed last.
#
#   scripts/device_check.sh [--out DIR]     (default: $OUT, else ./device_out)
# Target: under 8 minutes on one H200. Each step has its own time limit and a
# failing step never stops the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_out}"
if [ "${1:-}" = "--out" ]; then out="$2"; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
done

summary=()
step() {  # step NAME LIMIT_S CMD...  -> runs CMD with a time limit, logs to $out/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=PASS
  [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
  [ $rc -eq 124 ] && status="TIMEOUT"
  summary+=("$(printf '%-22s %-12s %5ss  %s' "$name" "$status" "$dt" "$(tail -n 1 "$out/$name.log" | cut -c1-90)")")
  echo "== $name: $status in ${dt}s"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2
} | tee "$out/env.txt"

export COGKERN_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
step build 420 python3 -m pip install -v --no-build-isolation --no-deps --disable-pip-version-check \
  --config-settings=cmake.define.COGKERN_PTXAS_VERBOSE=ON . || true
grep -E "registers|spill" "$out/build.log" | grep -B0 -E "spill (stores|loads)" | grep -v " 0 bytes spill stores, 0 bytes spill loads" \
  >"$out/spills.txt" || true
python3 -c "import cogkern; print(cogkern.build_info())" >>"$out/env.txt" 2>&1

step cuda_tests 300 python3 -m pytest tests -q -m cuda -x --junitxml="$out/cuda_tests.xml" || true
step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/sanitize_cases.py || true
step racecheck 240 compute-sanitizer --tool racecheck --error-exitcode 3 python3 scripts/sanitize_cases.py --only rope || true
step bench_rope 180 python3 -m benchmarks.bench_rope --quick --json "$out/bench_rope.json" || true
if command -v ncu >/dev/null; then
  step ncu_rope 180 ncu --clock-control none --set full -k regex:rope3d --launch-count 1 -f -o "$out/rope" \
    python3 -m benchmarks.bench_rope --quick || true
  ncu --import "$out/rope.ncu-rep" --csv --page raw \
    --metrics gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
    >"$out/ncu_rope.csv" 2>/dev/null || true
fi

echo
echo "---------------- benchmark tables ----------------"
sed -n '/^3D RoPE/,$p' "$out/bench_rope.log" 2>/dev/null
echo
echo "---------------- non-zero spills (ptxas) ----------------"
if [ -s "$out/spills.txt" ]; then cat "$out/spills.txt"; else echo "none"; fi
echo
echo "---------------- summary ($out) ----------------"
cat "$out/env.txt"
printf '%s\n' "${summary[@]}"
