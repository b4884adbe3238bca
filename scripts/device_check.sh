#!/usr/bin/env bash
# The one script for the GPU machine: build (no build isolation, sm_90a, ptxas
# register/spill report), all CUDA tests, compute-sanitizer memcheck and
# racecheck on small cases of each kernel, the quick benchmarks and one Nsight
# Compute capture; the Hopper (wgmma) kernels' tests, sanitizer run and
# benchmark each in a process of its own; scripts/wgmma_probe.py says where
# they go wrong, if they do. Prints a summary table last.
#
#   scripts/device_check.sh [--out DIR]     (default: $OUT, else ./device_out)
#
# DEVICE_CHECK_STEPS=name,name runs only those steps (names as in the summary),
# e.g. a rerun after a fix on a still-warm machine: DEVICE_CHECK_STEPS=build,sm90_tests.
# The build directory (build/device) is kept, so such a rebuild is incremental.
#
# DIR receives two files only (the device tool brings back at most 8):
# summary.txt (what is printed at the end) and logs.tgz (every log, JUnit XML,
# benchmark JSON/CSV/PNG, the ncu report). Steps past the time budget
# (DEVICE_CHECK_BUDGET seconds, default 450) are skipped, so the summary always
# comes out; a failing step never stops the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_out}"
if [ "${1:-}" = "--out" ]; then out="$2"; fi
mkdir -p "$out"
work=$(mktemp -d)
budget=${DEVICE_CHECK_BUDGET:-450}
t_start=$(date +%s)
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8  # the latter for the deterministic attention backward
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
done
if ! command -v compute-sanitizer >/dev/null; then
  for d in "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer" /usr/local/cuda/compute-sanitizer; do
    [ -x "$d/compute-sanitizer" ] && export PATH="$PATH:$d" && break
  done
fi

summary=()
last_rc=0  # the exit status of the latest step (124: timed out)
step() {  # step NAME LIMIT_S CMD...  -> CMD under a time limit, logged to $work/NAME.log
  local name=$1 limit=$2; shift 2
  if [ -n "${DEVICE_CHECK_STEPS:-}" ] && [[ ",$DEVICE_CHECK_STEPS," != *",$name,"* ]]; then
    summary+=("$(printf '%-16s %-12s %5ss  %s' "$name" "SKIPPED" 0 "not in DEVICE_CHECK_STEPS")")
    return 0
  fi
  local left=$(( budget - ($(date +%s) - t_start) ))
  if [ "$left" -le 20 ]; then
    summary+=("$(printf '%-16s %-12s %5ss  %s' "$name" "SKIPPED" 0 "time budget spent")")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  last_rc=$rc
  local dt=$(( $(date +%s) - t0 ))
  local status=PASS
  [ $rc -ne 0 ] && status="FAIL(rc=$rc)"
  [ $rc -eq 124 ] && status="TIMEOUT"
  summary+=("$(printf '%-16s %-12s %5ss  %s' "$name" "$status" "$dt" "$(tail -n 1 "$work/$name.log" | cut -c1-100)")")
  echo "== $name: $status in ${dt}s"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2
} >"$work/env.txt" 2>&1
cat "$work/env.txt"

export COGKERN_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" CMAKE_BUILD_PARALLEL_LEVEL=16
step build 300 python3 -m pip install -v --no-build-isolation --no-deps --disable-pip-version-check \
  --config-settings=build-dir=build/device --config-settings=cmake.define.COGKERN_PTXAS_VERBOSE=ON .
grep -E "spill (stores|loads)" "$work/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" \
  | sort | uniq -c >"$work/spills.txt" || true
grep -E "ptxas warning|Potential Performance Loss" "$work/build.log" | sort | uniq -c >>"$work/spills.txt" || true
if [ -f "$work/build.log" ] && ! grep -q "ptxas info" "$work/build.log"; then
  echo "(no kernel was compiled in this run: an incremental build reports only what it recompiles)" >>"$work/spills.txt"
fi
python3 -c "import cogkern; print(cogkern.build_info())" >>"$work/env.txt" 2>&1

# The Hopper (wgmma) kernels, never run on hardware before, go in processes of
# their own: a fault there poisons the CUDA context of everything after it.
step cuda_tests 180 python3 -m pytest tests -q -m "cuda and not sm90" --junitxml="$work/cuda_tests.xml" -p no:cacheprovider
step sm90_tests 100 python3 -m pytest tests -q -m sm90 -k "not warp" --junitxml="$work/sm90_tests.xml" -p no:cacheprovider
# The warp-specialized forward (TMA, mbarriers) on its own: an mbarrier wait that never
# completes hangs the kernel until the step's time limit; -v names the test it hung in.
step sm90_ws_tests 90 python3 -m pytest tests -v -m sm90 -k "warp" --junitxml="$work/sm90_ws_tests.xml" -p no:cacheprovider
probe_args=()
[ "$last_rc" -eq 124 ] && probe_args=(--skip-ws)  # a warp-specialized kernel hung: don't hang again
grep -hE "^(FAILED|ERROR)" "$work/cuda_tests.log" "$work/sm90_tests.log" "$work/sm90_ws_tests.log" 2>/dev/null | head -40 >"$work/cuda_failures.txt" || true
# Where the Hopper kernels go wrong, if they do: layout maps of the wgmma/TMA tile, and
# each opt-in attention kernel against mma.sync by batch/head/row slice/column chunk.
step wgmma_probe 60 python3 scripts/wgmma_probe.py ${probe_args[@]+"${probe_args[@]}"}
# The numbers next (an issue closes on tests and measurements), then the diagnostics.
step benchmarks 150 python3 -m benchmarks.run --quick --out "$work/bench"
step bench_sm90 90 python3 -m benchmarks.bench_attention --quick --sm90 --json "$work/bench_sm90.json"
step attention_check 90 python3 scripts/attention_cuda_check.py --quick
step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/sanitize_cases.py --only rope,optimizer,attention
step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 3 python3 scripts/sanitize_cases.py --only rope,attention
step sm90_sanitize 60 compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/sanitize_cases.py --only wgmma
step sm90_racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 3 python3 scripts/sanitize_cases.py --only wgmma
if command -v ncu >/dev/null; then
  step ncu_attention 60 profiling/ncu.sh --what attention --set full --out "$work"
  # The opt-in Hopper kernels (warp-specialized wgmma forward and backward): per-kernel times and occupancy.
  step ncu_sm90 60 env COGKERN_ATTENTION_SM90=4 COGKERN_ATTENTION_SM90_BWD=3 \
    profiling/ncu.sh --what attention --set basic --out "$work/ncu_sm90"
fi

{
  echo "---------------- benchmark tables ----------------"
  sed -n '/^Ceilings/,$p' "$work/benchmarks.log" 2>/dev/null
  echo
  echo "---------------- attention with the Hopper (wgmma) kernels ----------------"
  sed -n '/^Fused attention/,$p' "$work/bench_sm90.log" 2>/dev/null
  echo
  echo "---------------- CUDA test failures ----------------"
  if [ -s "$work/cuda_failures.txt" ]; then cat "$work/cuda_failures.txt"; else tail -n 1 "$work/cuda_tests.log" 2>/dev/null; fi
  echo
  echo "---------------- wgmma probe: what failed and where (scripts/wgmma_probe.py) ----------------"
  grep -vE "^(ok  |\.\.\.\. )" "$work/wgmma_probe.log" 2>/dev/null | head -60
  echo
  echo "---------------- non-zero spills and ptxas warnings (count x line) ----------------"
  if [ -s "$work/spills.txt" ]; then cat "$work/spills.txt"; else echo "none"; fi
  echo
  echo "---------------- summary (total $(( $(date +%s) - t_start ))s) ----------------"
  cat "$work/env.txt"
  printf '%s\n' "${summary[@]}"
} >"$work/summary.txt"
cp "$work/summary.txt" "$out/summary.txt"
tar czf "$out/logs.tgz" -C "$work" . 2>/dev/null
cat "$out/summary.txt"
