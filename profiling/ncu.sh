#!/usr/bin/env bash
# Nsight Compute on the cogkern kernels of one profiled iteration (profile_step.py).
#   profiling/ncu.sh [--what train_step|rope|attention|optimizer] [--out DIR] [--set full|basic] [--small]
# Saves DIR/<what>.ncu-rep and prints a CSV summary per kernel: duration,
# achieved occupancy, DRAM throughput, tensor pipe utilization, registers, spills.
set -euo pipefail
cd "$(dirname "$0")/.."
what=train_step out=${OUT:-profile_out} set=full extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --what) what=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --set) set=$2; shift 2 ;;
    --small) extra+=(--small); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v ncu >/dev/null || { echo "ncu (Nsight Compute) is not installed here" >&2; exit 1; }
mkdir -p "$out"
# --clock-control none: measure at the clocks the card really runs (never change the card's settings).
ncu --clock-control none --set "$set" --nvtx --nvtx-include "cogkern_step/" --launch-count 40 \
  -f -o "$out/$what" python3 profiling/profile_step.py --what "$what" "${extra[@]}"
ncu --import "$out/$what.ncu-rep" --csv --page raw --metrics \
gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__block_size \
  | tee "$out/$what.csv"
# The Hopper wgmma kernels run on the GMMA pipe, which the hmma column above does
# not count; a separate import, so that a metric this ncu lacks costs only this.
ncu --import "$out/$what.ncu-rep" --csv --page raw --metrics \
  gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
  >"$out/$what.gmma.csv" 2>&1 && cat "$out/$what.gmma.csv" || echo "no GMMA pipe metric in this ncu"
echo "report: $out/$what.ncu-rep (open with ncu-ui); summary: $out/$what.csv"
echo "spills: rebuild with -C cmake.define.COGKERN_PTXAS_VERBOSE=ON and read ptxas' 'spill stores/loads' lines"
