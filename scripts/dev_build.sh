#!/usr/bin/env bash
# Incremental developer build: compiles the extension in build/dev (ccache +
# ninja) and drops it into python/cogkern, so `PYTHONPATH=python pytest` runs
# against it without reinstalling. Usage: scripts/dev_build.sh [extra cmake -D...]
#   COGKERN_CUDA=AUTO|ON|OFF, TORCH_CUDA_ARCH_LIST (default here: 9.0a), BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
build=${BUILD_DIR:-build/dev}
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCOGKERN_CUDA="${COGKERN_CUDA:-AUTO}" -DPython_EXECUTABLE="$(command -v python3)" "$@" >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
grep -E "cogkern:" "$build.configure.log" || true
cmake --build "$build" -j "${JOBS:-2}"
cp "$build"/_C*.so "$build"/_build_config.py python/cogkern/
echo "dev build ready: PYTHONPATH=python"
