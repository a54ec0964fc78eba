#!/usr/bin/env bash
# Configures and builds csrc/ as a LibTorch library with CMake (CPU kernels) and runs the C++
# examples against it. Uses the torch of .venv (scripts/setup.sh makes it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
build=$(mktemp -d "${TMPDIR:-/tmp}/lsr_fast-cmake.XXXXXX")
trap 'rm -rf "$build"' EXIT
cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > "$build/configure.log" \
  || { cat "$build/configure.log"; echo "cmake: configure failed"; exit 1; }
cmake --build "$build" -j 2 > "$build/build.log" 2>&1 || { tail -50 "$build/build.log"; echo "cmake: build failed"; exit 1; }
"$build/lsr_fast_example"
"$build/lsr_fast_prototype_example"
echo "cmake: LibTorch library and examples built and ran"
