#!/usr/bin/env bash
# Nsight Systems timeline of one profiled iteration (cudaProfilerApi capture range of profile_step.py).
#   profiling/nsys.sh [--what train_step|rope|attention|optimizer] [--out DIR] [--small]
set -euo pipefail
cd "$(dirname "$0")/.."
what=train_step out=${OUT:-profile_out} extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --what) what=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --small) extra+=(--small); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if ! command -v nsys >/dev/null; then
  echo "nsys (Nsight Systems) is not installed on this machine."
  echo "Use instead: python profiling/profile_step.py --what $what --trace $out/$what.json  (torch.profiler Chrome trace)"
  exit 1
fi
mkdir -p "$out"
nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx,osrt \
  -o "$out/$what" --force-overwrite true python3 profiling/profile_step.py --what "$what" "${extra[@]}"
nsys stats --report cuda_gpu_kern_sum "$out/$what.nsys-rep" | head -40
