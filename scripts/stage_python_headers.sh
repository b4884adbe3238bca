#!/usr/bin/env bash
# Stages a CPython's C headers in the tree, for a GPU machine whose python3 has
# no Python.h (a venv over a distribution Python without its -dev package):
# scripts/device_check.sh builds against them there. Headers of any patch
# release serve an extension of the same minor version (the C ABI of 3.Y does
# not change between 3.Y.x releases; CMake's FindPython compares major.minor).
#
#   scripts/stage_python_headers.sh [--version 3.12] [--from INCLUDE_DIR] [--dest DIR]
#
# Default source: the include dir of a python3.Y on PATH, else of a pyenv 3.Y.x.
# Default destination: build/python-headers (git-ignored), which receives
# build/python-headers/3.Y/include/python3.Y/{Python.h,pyconfig.h,cpython/,...}.
# Carry it to the GPU machine with the `run` tool's carry: ["build/python-headers"].
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.12 from="" dest=build/python-headers
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$from" ]; then
  for py in "python$version" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version"; do
    command -v "$py" >/dev/null 2>&1 || continue
    inc=$("$py" -c "import sysconfig; print(sysconfig.get_path('include'))" 2>/dev/null) || continue
    if [ -f "$inc/Python.h" ]; then from=$inc; break; fi
  done
fi
if [ -z "$from" ] || [ ! -f "$from/Python.h" ]; then
  echo "stage_python_headers: no Python.h of CPython $version found${from:+ in $from}; pass --from INCLUDE_DIR" >&2
  exit 1
fi
# The headers must be the version asked for: a 3.11 Python.h would build a 3.12 extension that crashes.
found=$(sed -n 's/^#define PY_MINOR_VERSION[[:space:]]*\([0-9]*\).*/\1/p' "$from/patchlevel.h")
if [ "3.$found" != "$version" ]; then
  echo "stage_python_headers: $from holds the headers of 3.$found, not $version" >&2
  exit 1
fi
target="$dest/$version/include/python$version"
rm -rf "$target"
mkdir -p "$target"
cp -R "$from/." "$target/"
# Debian's pyconfig.h only includes <TRIPLET/pythonX.Y/pyconfig.h> from /usr/include: carry the real one.
real_pyconfig="/usr/include/x86_64-linux-gnu/python$version/pyconfig.h"
if grep -q "include <x86_64-linux-gnu/python$version/pyconfig.h>" "$target/pyconfig.h" 2>/dev/null; then
  [ -f "$real_pyconfig" ] || { echo "stage_python_headers: $from/pyconfig.h includes $real_pyconfig, which is missing" >&2; exit 1; }
  cp "$real_pyconfig" "$target/pyconfig.h"
fi
echo "staged $(sed -n 's/^#define PY_VERSION[[:space:]]*"\(.*\)"/\1/p' "$from/patchlevel.h") headers from $from in $target ($(du -sh "$target" | cut -f1))"
