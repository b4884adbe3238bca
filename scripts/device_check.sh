#!/usr/bin/env bash
# The one script for the GPU machine, in the order that pays when its time runs out:
#   preflight        Python.h for this python3 (else the carried CPython headers), nvcc, ncu, compute-sanitizer
#   build            pip install --no-build-isolation (sm_90a, ptxas register/spill report), build dir build/device
#   selftest         python -m cogkern.selftest --quick: every kernel checked and timed, streamed into $OUT
#   wgmma_probe      scripts/wgmma_probe.py: where a Hopper kernel goes wrong, if one does
#   cuda_tests, sm90_tests, sm90_ws_tests
#                    the CUDA test suites (the Hopper and the warp-specialized ones in processes of
#                    their own), each test under COGKERN_TEST_TIMEOUT (tests/conftest.py)
#   memcheck         compute-sanitizer memcheck, only on the kernels that failed in an earlier step
#   ncu              Nsight Compute on one launch each of the fastest Hopper forward and backward
#   bench_optimizer  the optimizer benchmark at 1 B parameters
#
# The call, from the checkout, with the device tool (stage the headers first, once:
# scripts/stage_python_headers.sh --version 3.12):
#   run(command="scripts/device_check.sh", timeout_s=570, carry=["build/python-headers/3.12"])
# A rerun of failing steps right after it, while the machine is still warm (30 s; the
# build dir and this script's work dir survive there, so the build is incremental):
#   run(command="DEVICE_CHECK_STEPS=build,sm90_tests scripts/device_check.sh", timeout_s=300,
#       carry=["build/python-headers/3.12"])
# On a fresh machine instead (the warm one went back), rebuild and carry what the selection
# needs: copy the returned selftest.json to build/device_prev/, add it to carry, and set
# DEVICE_CHECK_SELFTEST_JSON=build/device_prev/selftest.json.
# Device time: about 1.5 min to start the machine + at most DEVICE_CHECK_BUDGET (510 s) +
# the transfers: about 11 of the 15 minutes, which leaves room for one such rerun. The
# steps' limits add up to more than the budget (a hang costs a step its whole limit); the
# steps' real times on the H200 are not measured yet: read them off the first summary.txt.
#
#   scripts/device_check.sh [--out DIR]     (default: $OUT, else ./device_out)
#
# DIR receives, as each step ends (so a run killed at any point returns what it had):
#   summary.txt    one line per step (name, status, seconds, result), then a RUNNING line while one runs
#   logs.tgz       every log, JUnit XML, JSON, spill report, ncu report (also re-packed every 20 s)
#   selftest.txt   the selftest's rows as it prints them;  selftest.json  its records, after each family
# (the device tool brings back at most 8 files). Statuses: PASS, FAIL(rc=N), TIMEOUT, SKIPPED (why),
# DRY-RUN. A failing step never stops the others; a step past the budget is skipped. The script
# exits 0 once the summary is out: the verdict is summary.txt's statuses.
#
# Knobs (environment):
#   DEVICE_CHECK_STEPS=a,b        only these steps (the others keep their earlier logs in the work dir)
#   DEVICE_CHECK_BUDGET=S         seconds for the whole run (default 510)
#   DEVICE_CHECK_LIMIT_<step>=S   one step's limit, e.g. DEVICE_CHECK_LIMIT_selftest=240
#   DEVICE_CHECK_WORK=DIR         logs and state between steps (default build/device_check; kept for reruns)
#   DEVICE_CHECK_SELFTEST_JSON=F  an earlier run's selftest.json, to decide from when the selftest is not rerun
#   DEVICE_CHECK_SELFTEST_ARGS=.. more arguments for the selftest, e.g. "--only attention"
#   DEVICE_CHECK_TESTS=PATHS      the test files or folders of the CUDA test steps (default tests)
#   DEVICE_CHECK_TEST_TIMEOUT=S   each test's limit (COGKERN_TEST_TIMEOUT; default 30)
#   DEVICE_CHECK_SKIP_WS=1        skip the warp-specialized kernels from the start (else: once one hangs);
#                                 =0 in a rerun: try them again although an earlier step saw one hang
#   DEVICE_CHECK_DRY_RUN=1        on a machine without a GPU: every step's logic, with the CPU backend
#                                 (selftest --device cpu, COGKERN_CUDA_TESTS_DEVICE=cpu, wgmma_probe
#                                 --cpu-dry-run); the build, compute-sanitizer and ncu are not run and say so
#
# A warp-specialized kernel that hangs (a selftest family timed out, the probe stopped inside one,
# a ws test ran past its timeout) is written to WORK/ws_hung.txt, and every later step leaves the
# warp-specialized kernels out (--skip-ws, -k "not warp", the fastest non-ws kernel for ncu).
set -uo pipefail
# The dry run imports cogkern from here (default: the checkout's python/, as scripts/dev_build.sh leaves it;
# the tests pass the directory of the cogkern under test).
DRY_PYTHONPATH=${DEVICE_CHECK_PYTHONPATH:-python}
self=$(readlink -f "$0")
cd "$(dirname "$self")/.." || exit 1

dry_run() { [ "${DEVICE_CHECK_DRY_RUN:-0}" = 1 ]; }
ws_hung() { [ -s "$DEVICE_CHECK_WORK/ws_hung.txt" ]; }
SKIP=10  # a step body's exit status for "skipped, and why is its last line"

# ---------------------------------------------------------------- step bodies
# Each runs in a process of its own (this script with --body NAME) under `timeout`, its output
# in WORK/NAME.log; its last line starting "result: " is its summary line.

body_preflight() {
  local ok=1 inc ver carried
  echo "python3: $(command -v python3) ($(python3 -V 2>&1))"
  ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  inc=$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')
  command -v python3-config >/dev/null && echo "python3-config --includes: $(python3-config --includes 2>&1)"
  : >"$DEVICE_CHECK_WORK/python_include.txt"
  local python_h
  if [ -f "$inc/Python.h" ]; then
    python_h="its own ($inc)"
  else
    carried=build/python-headers/$ver/include/python$ver
    if [ -f "$carried/Python.h" ]; then
      # Any 3.Y.x's headers serve a 3.Y extension; another minor's would build one that crashes.
      local minor
      minor=$(sed -n 's/^#define PY_MINOR_VERSION[[:space:]]*\([0-9]*\).*/\1/p' "$carried/patchlevel.h")
      if [ "3.$minor" = "$ver" ]; then
        readlink -f "$carried" >"$DEVICE_CHECK_WORK/python_include.txt"
        python_h="carried $(sed -n 's/^#define PY_VERSION[[:space:]]*"\(.*\)"/\1/p' "$carried/patchlevel.h") headers ($carried; none in $inc)"
      else
        python_h="MISSING: none in $inc, and $carried holds 3.$minor's"; ok=0
      fi
    else
      python_h="MISSING: none in $inc; stage them (scripts/stage_python_headers.sh --version $ver) and carry build/python-headers/$ver"
      ok=0
    fi
  fi
  echo "Python.h: $python_h"
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  python3 -c "import scikit_build_core, sys; print('scikit-build-core', scikit_build_core.__version__)" 2>&1 || ok=0
  local tool tools=""
  for tool in nvcc ncu compute-sanitizer cmake ninja nvidia-smi; do
    if command -v "$tool" >/dev/null; then echo "$tool: $(command -v "$tool")"; tools+=" $tool"
    else echo "$tool: not found"; fi
  done
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  if ! command -v nvcc >/dev/null && ! dry_run; then ok=0; fi
  echo "result: Python.h $python_h; found:${tools:- none}"
  [ $ok = 1 ]
}

body_build() {
  local inc args
  inc=$(cat "$DEVICE_CHECK_WORK/python_include.txt" 2>/dev/null)
  export COGKERN_CUDA=${COGKERN_CUDA:-ON} TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  args=(--config-settings=build-dir="${DEVICE_CHECK_BUILD_DIR:-build/device}"
        --config-settings=cmake.define.COGKERN_PTXAS_VERBOSE=ON)
  # scikit-build-core hints FindPython with sysconfig's include dir; this -D comes after its -C, so wins.
  [ -n "$inc" ] && args+=(--config-settings=cmake.define.Python_INCLUDE_DIR="$inc")
  local cmd=(python3 -m pip install -v --no-build-isolation --no-deps --disable-pip-version-check "${args[@]}" .)
  echo "COGKERN_CUDA=$COGKERN_CUDA TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST ${cmd[*]}"
  if dry_run; then
    echo "not built (dry run): the later steps use the extension already in python/cogkern"
    PYTHONPATH="$DRY_PYTHONPATH" python3 -c "import cogkern; print(cogkern.build_info())" || return 1
    echo "result: DRY-RUN: not built; would run the command above"
    return $SKIP
  fi
  "${cmd[@]}" || { echo "result: the build failed (the error is above the pip traceback)"; return 1; }
  grep -E "Found Python|Python_INCLUDE_DIR" "$DEVICE_CHECK_WORK/build.log" | sort -u | head -5
  local spills="$DEVICE_CHECK_WORK/spills.txt"
  # Each non-zero spill line with the kernel it belongs to (ptxas names it on the line before).
  local demangle=cat
  command -v c++filt >/dev/null && demangle=c++filt
  { awk '/Function properties for/ {fn = $NF}
         /spill stores/ && !/ 0 bytes spill stores, 0 bytes spill loads/ {sub(/^ +/, ""); print $0 "  <- " fn}' \
      "$DEVICE_CHECK_WORK/build.log" | "$demangle" | sed -E 's/cogkern::flash::\(anonymous namespace\)::/cogkern::flash::/' | sort | uniq -c
    grep -E "ptxas warning|Potential Performance Loss" "$DEVICE_CHECK_WORK/build.log" | sort | uniq -c
    grep -q "ptxas info" "$DEVICE_CHECK_WORK/build.log" || echo "(no kernel was compiled in this run: an incremental build reports only what it recompiles)"
  } >"$spills"
  python3 -c "import cogkern; print(cogkern.build_info())" || { echo "result: built, but cogkern does not import"; return 1; }
  echo "result: built; $(grep -c . "$spills" | tr -d ' ') spill/warning lines (spills.txt)${inc:+; Python.h from $inc}"
}

body_selftest() {
  local args=(--quick --json "$DEVICE_CHECK_OUT/selftest.json")
  if dry_run; then args+=(--device cpu --timeout "${DEVICE_CHECK_SELFTEST_TIMEOUT:-120}")
  else args+=(--timeout "${DEVICE_CHECK_SELFTEST_TIMEOUT:-45}"); fi
  ws_hung && args+=(--skip-ws)
  # shellcheck disable=SC2206  # word splitting of the extra arguments is the point
  args+=(${DEVICE_CHECK_SELFTEST_ARGS:-})
  dry_run && export PYTHONPATH="$DRY_PYTHONPATH"
  echo "python3 -m cogkern.selftest ${args[*]}"
  python3 -m cogkern.selftest "${args[@]}" 2>&1 | tee "$DEVICE_CHECK_OUT/selftest.txt"
  local rc=$?
  echo "result: $(python3 scripts/device_check_select.py summary --json "$DEVICE_CHECK_OUT/selftest.json")"
  return $rc
}

body_wgmma_probe() {
  local args=()
  ws_hung && args+=(--skip-ws)
  if dry_run; then args+=(--cpu-dry-run); export PYTHONPATH="$DRY_PYTHONPATH"; fi
  echo "python3 scripts/wgmma_probe.py ${args[*]}"
  python3 scripts/wgmma_probe.py ${args[@]+"${args[@]}"}
  local rc=$?
  echo "result: $(grep '^wgmma_probe: ' "$DEVICE_CHECK_WORK/wgmma_probe.log" | tail -n 1)"
  return $rc
}

run_pytest() {  # run_pytest NAME PYTEST-ARGS...: one CUDA test suite, each test under COGKERN_TEST_TIMEOUT
  local name=$1; shift
  export COGKERN_TEST_TIMEOUT=${DEVICE_CHECK_TEST_TIMEOUT:-30}
  if dry_run; then export COGKERN_CUDA_TESTS_DEVICE=cpu PYTHONPATH="$DRY_PYTHONPATH"; fi
  # shellcheck disable=SC2086  # DEVICE_CHECK_TESTS is a list of paths
  python3 -m pytest ${DEVICE_CHECK_TESTS:-tests} -q -p no:cacheprovider --junitxml="$DEVICE_CHECK_WORK/$name.xml" "$@"
  local rc=$?
  if [ $rc = 5 ]; then echo "result: SKIPPED: no test selected"; return $SKIP; fi  # pytest's "no tests collected"
  local hung
  hung=$(grep -h "^TIMEOUT: " "$DEVICE_CHECK_WORK/$name.log" | head -n 1)
  echo "result: ${hung:-$(grep -E "(passed|failed|skipped|error|no tests ran)" "$DEVICE_CHECK_WORK/$name.log" | tail -n 1)}"
  return $rc
}

body_cuda_tests() { run_pytest cuda_tests -m "cuda and not sm90"; }
body_sm90_tests() { run_pytest sm90_tests -m sm90 -k "not warp"; }
body_sm90_ws_tests() {
  if ws_hung; then echo "result: SKIPPED: a warp-specialized kernel hung: $(head -n 1 "$DEVICE_CHECK_WORK/ws_hung.txt")"; return $SKIP; fi
  # -v: a hang's log names the test it hung in even if the watchdog's line is lost.
  run_pytest sm90_ws_tests -v -m sm90 -k warp
}

body_memcheck() {
  local found groups
  found=$(python3 scripts/device_check_select.py failed-groups --json "$DEVICE_CHECK_WORK/selftest.json" \
    --junit "$DEVICE_CHECK_WORK"/*.xml --probe-log "$DEVICE_CHECK_WORK/wgmma_probe.log" \
    --test-log "$DEVICE_CHECK_WORK"/cuda_tests.log "$DEVICE_CHECK_WORK"/sm90_tests.log "$DEVICE_CHECK_WORK"/sm90_ws_tests.log)
  echo "$found"
  groups=$(head -n 1 <<<"$found")
  if [ -z "$groups" ]; then echo "result: SKIPPED: no kernel failed in an earlier step"; return $SKIP; fi
  local cmd=(compute-sanitizer --tool memcheck --error-exitcode 3 python3 scripts/sanitize_cases.py --only "$groups")
  ws_hung && cmd+=(--skip-ws)
  echo "${cmd[*]}"
  if dry_run; then echo "result: SKIPPED (no GPU): would run memcheck on $groups"; return $SKIP; fi
  if ! command -v compute-sanitizer >/dev/null; then echo "result: SKIPPED: no compute-sanitizer here, for $groups"; return $SKIP; fi
  "${cmd[@]}"
  local rc=$?
  echo "result: memcheck on $groups: $(grep -E "ERROR SUMMARY|sanitize_cases:" "$DEVICE_CHECK_WORK/memcheck.log" | tail -n 2 | tr '\n' ' ')"
  return $rc
}

body_ncu() {
  local select=(python3 scripts/device_check_select.py fastest --json "$DEVICE_CHECK_WORK/selftest.json")
  ws_hung && select+=(--skip-ws)
  local fwd bwd
  fwd=$("${select[@]}" --direction forward)
  bwd=$("${select[@]}" --direction backward)
  echo "fastest passing Hopper forward (kernel mode TFLOP/s): ${fwd:-none}; backward: ${bwd:-none}"
  if [ -z "$fwd$bwd" ]; then
    if dry_run; then echo "result: SKIPPED (no GPU): no Hopper kernel in the CPU selftest's results"
    else echo "result: SKIPPED: no Hopper kernel passed every selftest check"; fi
    return $SKIP
  fi
  # One ncu process: the profiled step launches the forward before the backward, so the first
  # match of each name pattern is one launch of each.
  local kernels="" count=0
  [ -n "$fwd" ] && kernels+="|flash_fwd_sm90" && count=$((count + 1))
  [ -n "$bwd" ] && kernels+="|flash_bwd_sm90" && count=$((count + 1))
  local cmd=(env COGKERN_ATTENTION_SM90="$(cut -d' ' -f2 <<<"${fwd:-x 0}")" COGKERN_ATTENTION_SM90_BWD="$(cut -d' ' -f2 <<<"${bwd:-x 0}")"
             ncu --clock-control none --set full --nvtx --nvtx-include "cogkern_step/" -k "regex:${kernels#|}"
             --launch-count "$count" -f -o "$DEVICE_CHECK_WORK/ncu_attention" python3 profiling/profile_step.py --what attention)
  echo "${cmd[*]}"
  local what="${fwd:+forward ${fwd% *}}${fwd:+${bwd:+, }}${bwd:+backward ${bwd% *}}"
  if dry_run; then echo "result: SKIPPED (no GPU): would profile $what"; return $SKIP; fi
  if ! command -v ncu >/dev/null; then echo "result: SKIPPED: no ncu here, for $what"; return $SKIP; fi
  "${cmd[@]}" || { echo "result: ncu failed on $what"; return 1; }
  ncu --import "$DEVICE_CHECK_WORK/ncu_attention.ncu-rep" --csv --page raw --metrics \
gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
    | tee "$DEVICE_CHECK_WORK/ncu_attention.csv"
  echo "result: profiled $what: ncu_attention.ncu-rep, $(($(grep -c . "$DEVICE_CHECK_WORK/ncu_attention.csv") - 2)) launches in ncu_attention.csv"
}

body_bench_optimizer() {
  local args=(--json "$DEVICE_CHECK_WORK/bench_optimizer.json")
  # On the GPU the full repeat count: at 1 B params a step takes milliseconds, the setup dominates.
  if dry_run; then args+=(--quick --device cpu --params 2e6); export PYTHONPATH="$DRY_PYTHONPATH"
  else args+=(--params 1e9); fi
  echo "python3 -m benchmarks.bench_optimizer ${args[*]}"
  python3 -m benchmarks.bench_optimizer "${args[@]}" || { echo "result: the benchmark failed"; return 1; }
  local line
  line=$(python3 - "$DEVICE_CHECK_WORK/bench_optimizer.json" <<'EOF_PY'
import json, sys
d = json.load(open(sys.argv[1]))
modes = ", ".join(f"{m} {r['ms_plain']:.3g} ms ({r['pct_copy_plain']:.0f}% of copy, {r['speedup_vs_torch']:.2f}x torch)"
                  for m, r in d["modes"].items())
n = d["params"]
print((f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M") + f" params: {modes}")
EOF_PY
)
  echo "result: ${line:-see the table in bench_optimizer.log}"
}

if [ "${1:-}" = "--body" ]; then
  "body_$2"
  exit $?
fi

# ---------------------------------------------------------------- the runner
# (all in functions, called on the last line: bash has read the whole file before it runs any of it)
pack() {  # the logs, whole or not at all: a reader never sees a half-written archive
  tar czf "$out/.logs.tgz.tmp" -C "$work" --exclude=./logs.tgz . 2>/dev/null && mv -f "$out/.logs.tgz.tmp" "$out/logs.tgz"
}
publish() {  # publish [RUNNING-LINE]: summary.txt (+ the step under way) and the logs into $out
  cp "$work/summary.txt" "$out/.summary.tmp"
  if [ -n "${1:-}" ]; then echo "$1" >>"$out/.summary.tmp"; fi
  mv -f "$out/.summary.tmp" "$out/summary.txt"
  if [ -f "$work/selftest.json" ] && [ ! -f "$out/selftest.json" ]; then cp "$work/selftest.json" "$out/selftest.json"; fi
  pack
}
record() {  # record NAME STATUS SECONDS RESULT
  printf '%-16s %-12s %5ss  %s\n' "$1" "$2" "$3" "$(cut -c1-160 <<<"$4")" >>"$work/summary.txt"
  echo "== $1: $2 in ${3}s: $4"
  publish
}
note_ws_hang() {  # note_ws_hang WHY: every later step leaves the warp-specialized kernels out
  ws_hung || { echo "$1" >"$work/ws_hung.txt"; echo "   warp-specialized kernels skipped from here on: $1"; }
}

step() {  # step NAME DEFAULT-LIMIT-S
  local name=$1 limit=$2
  local override="DEVICE_CHECK_LIMIT_$name"
  limit=${!override:-$limit}
  if [ -n "${DEVICE_CHECK_STEPS:-}" ] && [[ ",$DEVICE_CHECK_STEPS," != *",$name,"* ]]; then return 0; fi
  local left=$(( budget - ($(date +%s) - t_start) ))
  if [ "$left" -le 15 ]; then record "$name" SKIPPED 0 "time budget spent (${budget}s)"; return 0; fi
  [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
  local t0
  t0=$(date +%s)
  publish "$(printf '%-16s %-12s %5ss  %s' "$name" RUNNING "-" "since $(date -u +%T), limit ${limit}s")"
  ( while sleep 20; do pack; done ) </dev/null >/dev/null 2>&1 &  # off our stdout: a caller reading it to EOF
  local packer=$!
  # timeout signals the whole process group, so the pytest/python under the body go too.
  timeout -k 10 "$limit" bash "$self" --body "$name" >"$work/$name.log" 2>&1
  local rc=$?
  kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
  local dt=$(( $(date +%s) - t0 )) status result
  result=$(grep "^result: " "$work/$name.log" | tail -n 1 | cut -c9-)
  case $rc in
    0) status=PASS ;;
    "$SKIP") status=SKIPPED; [[ $result == DRY-RUN* ]] && status=DRY-RUN ;;
    124|137) status=TIMEOUT  # the step's limit, or a test past COGKERN_TEST_TIMEOUT (tests/conftest.py exits 124)
      result=$(grep -h "^TIMEOUT: " "$work/$name.log" | head -n 1)
      [ -z "$result" ] && result="killed at its ${limit}s limit; last line: $(grep . "$work/$name.log" | tail -n 1)" ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  [ -z "$result" ] && result=$(grep . "$work/$name.log" | tail -n 1)
  [ "$name" = selftest ] && [ -f "$out/selftest.json" ] && cp "$out/selftest.json" "$work/selftest.json"
  record "$name" "$status" "$dt" "$result"
  LAST_RC=$rc
}

main() {
  out="${OUT:-device_out}"
  if [ "${1:-}" = "--out" ]; then out="$2"; fi
  mkdir -p "$out"
  work=${DEVICE_CHECK_WORK:-build/device_check}
  mkdir -p "$work" || exit 1
  DEVICE_CHECK_OUT=$(readlink -f "$out")
  DEVICE_CHECK_WORK=$(readlink -f "$work")
  work=$DEVICE_CHECK_WORK
  export DEVICE_CHECK_OUT DEVICE_CHECK_WORK
  # A full run starts clean; a rerun of some steps keeps the others' logs and the state they left.
  [ -z "${DEVICE_CHECK_STEPS:-}" ] && find "$work" -mindepth 1 -delete
  budget=${DEVICE_CHECK_BUDGET:-510}
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
  if [ -n "${DEVICE_CHECK_SELFTEST_JSON:-}" ]; then cp "$DEVICE_CHECK_SELFTEST_JSON" "$work/selftest.json"; fi
  case ${DEVICE_CHECK_SKIP_WS:-} in
    1) ws_hung || echo "DEVICE_CHECK_SKIP_WS=1" >"$work/ws_hung.txt" ;;
    0) rm -f "$work/ws_hung.txt" ;;  # a rerun after a fix: try them again
  esac

  {
    echo "==== device_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
         "budget ${budget}s${DEVICE_CHECK_STEPS:+ steps $DEVICE_CHECK_STEPS}$(dry_run && echo ' DRY RUN (no GPU)')"
    printf '%-16s %-12s %6s  %s\n' step status time result
  } >>"$work/summary.txt"

  step preflight 30
  step build 240
  step selftest 180
  why=$(python3 scripts/device_check_select.py ws-hung --json "$work/selftest.json") && note_ws_hang "$why"
  step wgmma_probe 60
  why=$(python3 scripts/device_check_select.py ws-hung --probe-log "$work/wgmma_probe.log") && note_ws_hang "$why"
  step cuda_tests 90
  step sm90_tests 60
  LAST_RC=0
  step sm90_ws_tests 45
  if [ "$LAST_RC" = 124 ] || [ "$LAST_RC" = 137 ]; then
    # -v writes a test's id when it starts and its verdict when it ends: an id with no verdict
    # is the test it was in when stopped (stopped while collecting is no hang).
    local last_test
    last_test=$(grep "::" "$work/sm90_ws_tests.log" | tail -n 1)
    if [ -n "$last_test" ] && ! grep -qE "(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)" <<<"$last_test"; then
      note_ws_hang "sm90_ws_tests stopped at its limit inside ${last_test%% *}"
    fi
  fi
  grep -qs "^TIMEOUT: " "$work/sm90_ws_tests.log" && note_ws_hang "$(grep -h "^TIMEOUT: " "$work/sm90_ws_tests.log" | head -n 1)"
  step memcheck 60
  step ncu 75
  step bench_optimizer 90

  echo "---- total $(( $(date +%s) - t_start ))s of ${budget}s" >>"$work/summary.txt"
  [ -s "$work/spills.txt" ] && { echo "---- non-zero spills and ptxas warnings (count x line)"; cat "$work/spills.txt"; } >>"$work/summary.txt"
  ws_hung && echo "---- warp-specialized kernels skipped: $(cat "$work/ws_hung.txt")" >>"$work/summary.txt"
  publish
  cat "$out/summary.txt"
}

main "$@"
