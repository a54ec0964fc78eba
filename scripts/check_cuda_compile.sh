#!/usr/bin/env bash
# Compile-only check of lsr_fast's CUDA kernels (csrc/cuda/*.cu) on a machine without a GPU.
#
#   scripts/check_cuda_compile.sh          # exit 0: every .cu compiled for sm_80 and sm_90,
#                                          # the extension linked and registers all CUDA ops
#
# 1. A virtual environment .venv-cuda (made once, reused) holds the CUDA 13.0 build of torch
#    (TORCH_VERSION, default 2.14.1) from the local package index, installed WITHOUT its
#    dependencies: the nvidia-* runtime wheels are ~2 GB and compiling needs none of them (the
#    kernels include only c10/cuda and ATen core headers, which need just the CUDA toolkit).
#    To import that torch without them, tiny stub libraries stand in for the missing shared
#    objects (libcublas.so.13, libcudnn.so.9, ...): empty, with the right sonames and symbol
#    versions, loaded lazily (TORCH_USE_RTLD_GLOBAL=1), so nothing ever calls into them.
# 2. setup.py builds the extension (LSR_FAST_CUDA=1, TORCH_CUDA_ARCH_LIST="8.0;9.0") into a
#    temporary folder, so the CPU build in lsr_fast/ is left alone. MAX_JOBS defaults to 2.
# 3. Checks: every .cu object was built (after a failure the remaining objects are still
#    compiled, to list every failing file), cuobjdump (toolkit, else the small
#    nvidia-cuda-cuobjdump wheel) finds sm_80 and sm_90 SASS of every .cu in the .so,
#    and loading the .so registers CUDA kernels for all 8 lsr_fast ops.
#
# Environment: TORCH_VERSION, MAX_JOBS, CUDA_HOME (else the toolkit behind `nvcc` on PATH,
# following a wrapper script), KEEP_BUILD=1 to keep the temporary build folder.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv-cuda"
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
JOBS=${MAX_JOBS:-2}
ARCHS="8.0;9.0"
START=$(date +%s)

say() { printf '[check_cuda_compile] %s\n' "$*"; }
die() { printf '[check_cuda_compile] ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(($(date +%s) - START))s"; }

# ---- CUDA toolkit --------------------------------------------------------------------------
toolkit_root() {
  if [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
    echo "$CUDA_HOME"
    return 0
  fi
  local nvcc real target
  nvcc=$(command -v nvcc) || return 1
  real=$(readlink -f "$nvcc")
  # /usr/local/bin/nvcc may be a wrapper script: `exec /usr/local/cuda-X/bin/nvcc "$@"`.
  if [ "$(head -c 2 "$real")" = "#!" ]; then
    target=$(grep -oE '/[^[:space:]"'\'']+/bin/nvcc' "$real" | head -n 1 || true)
    [ -n "$target" ] && real=$(readlink -f "$target")
  fi
  dirname "$(dirname "$real")"
}
TOOLKIT=$(toolkit_root) || die "no CUDA toolkit: set CUDA_HOME or put nvcc on PATH"
[ -f "$TOOLKIT/include/cuda_runtime.h" ] || die "$TOOLKIT does not look like a CUDA toolkit (no include/cuda_runtime.h)"
say "CUDA toolkit: $TOOLKIT ($("$TOOLKIT/bin/nvcc" --version | grep -o 'release [0-9.]*'))"

# ---- virtual environment -------------------------------------------------------------------
venv_ok() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$TORCH_VERSION')" 2>/dev/null
}
if ! venv_ok; then
  say "creating $VENV with torch==$TORCH_VERSION (no dependencies) ..."
  python3 -m venv "$VENV"
  PIPLOG="$VENV/pip-install.log"
  # Only what `import torch` and cpp_extension need; no nvidia-* wheels.
  if ! "$VENV/bin/pip" install --no-deps "torch==$TORCH_VERSION" typing-extensions sympy mpmath networkx jinja2 \
      markupsafe filelock fsspec numpy >"$PIPLOG" 2>&1; then
    tail -n 20 "$PIPLOG" >&2
    die "pip could not install torch==$TORCH_VERSION into $VENV (log: $PIPLOG)"
  fi
  "$VENV/bin/pip" install --no-deps --upgrade setuptools >>"$PIPLOG" 2>&1 || die "pip could not upgrade setuptools (log: $PIPLOG)"
  "$VENV/bin/pip" install --no-deps ninja >>"$PIPLOG" 2>&1 || say "ninja is not installable: building without it (serial, stops at the first error)"
  "$VENV/bin/pip" install --no-deps nvidia-cuda-cuobjdump >>"$PIPLOG" 2>&1 || say "nvidia-cuda-cuobjdump is not installable"
  say "venv ready after $(elapsed)"
fi
TORCH_DIR=$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])")

# ---- stub libraries for the runtime libraries torch links but compiling never uses -------------
STUBS="$VENV/stub-libs"
mkdir -p "$STUBS"
TORCH_LIBS=("$TORCH_DIR"/lib/*.so "$TORCH_DIR"/_C*.so)
missing=$(for lib in "${TORCH_LIBS[@]}"; do LD_LIBRARY_PATH="$STUBS" ldd "$lib" 2>/dev/null | awk '/not found/ {print $1}'; done |
  sort -u | grep -v '^libcuda\.so' || true)
if [ -n "$missing" ]; then
  command -v gcc >/dev/null && command -v readelf >/dev/null || die "gcc and readelf are needed to make the stub libraries"
  stub_dir=$(mktemp -d)
  : >"$stub_dir/empty.c"
  for soname in $missing; do
    # The symbol-version nodes torch's libraries ask of this soname (e.g. libcublas.so.13).
    nodes=$(for lib in "${TORCH_LIBS[@]}"; do readelf -V "$lib" 2>/dev/null; done |
      awk -v L="$soname" '/File:/ {cur = ($5 == L)} cur && /Name:/ {print $3}' | sort -u)
    version_flags=()
    if [ -n "$nodes" ]; then
      for node in $nodes; do echo "$node { global: *; };"; done >"$stub_dir/$soname.map"
      version_flags=("-Wl,--version-script=$stub_dir/$soname.map")
    fi
    gcc -shared -o "$STUBS/$soname" -Wl,-soname,"$soname" "${version_flags[@]}" "$stub_dir/empty.c"
  done
  rm -rf "$stub_dir"
  say "made stub libraries for: $(echo $missing | tr '\n' ' ')"
fi
export LD_LIBRARY_PATH="$STUBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TORCH_USE_RTLD_GLOBAL=1  # lazy binding: the stubs' (absent) functions are never called
export PATH="$VENV/bin:$PATH"   # ninja
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'not a CUDA build'" ||
  die "torch from $VENV does not import (see above)"

# ---- build ------------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lsr_fast_cuda_check.XXXXXX")
if [ "${KEEP_BUILD:-0}" = "1" ]; then say "build folder kept: $TMP"; else trap 'rm -rf "$TMP"' EXIT; fi
say "building (MAX_JOBS=$JOBS, TORCH_CUDA_ARCH_LIST=$ARCHS) into $TMP ..."
BUILD_LOG="$TMP/build.log"
build_rc=0
env LSR_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" CUDA_HOME="$TOOLKIT" MAX_JOBS="$JOBS" \
  "$VENV/bin/python" setup.py build_ext --build-temp "$TMP/build" --build-lib "$TMP/lib" \
  >"$BUILD_LOG" 2>&1 || build_rc=$?
if [ "$build_rc" -ne 0 ] && [ -f "$TMP/build/build.ninja" ]; then
  # ninja stopped at the first failure: compile what is left to list every failing file.
  (cd "$TMP/build" && ninja -k 0 -j "$JOBS" >>"$BUILD_LOG" 2>&1) || true
fi
say "build finished after $(elapsed) (setup.py exit code $build_rc)"

# ---- per-file results -------------------------------------------------------------------------
failed_cu=()
failed_other=()
for src in csrc/cuda/*.cu csrc/*.cpp csrc/cpu/*.cpp; do
  [ -e "$src" ] || continue
  obj=$(find "$TMP/build" -name "$(basename "${src%.*}").o" -path "*${src%.*}.o" 2>/dev/null | head -n 1)
  if [ -n "$obj" ]; then
    status="ok"
  else
    status="FAILED"
    case "$src" in
      *.cu) failed_cu+=("$src") ;;
      *) failed_other+=("$src") ;;
    esac
  fi
  printf '  %-44s %s\n' "$src" "$status"
done
if [ "${#failed_cu[@]}" -gt 0 ] || [ "${#failed_other[@]}" -gt 0 ] || [ "$build_rc" -ne 0 ]; then
  echo "---- compiler errors (first 80 lines; full log: $BUILD_LOG) ----"
  grep -nE 'error|FAILED|fatal' "$BUILD_LOG" | head -n 80 || tail -n 40 "$BUILD_LOG"
  if [ "${KEEP_BUILD:-0}" != "1" ]; then cp "$BUILD_LOG" "$ROOT/.venv-cuda/last-build.log"; echo "(log copied to .venv-cuda/last-build.log)"; fi
fi
[ "${#failed_cu[@]}" -eq 0 ] || die "CUDA sources failed to compile: ${failed_cu[*]}"
[ "${#failed_other[@]}" -eq 0 ] || die "C++ sources (not the CUDA kernels) failed to compile: ${failed_other[*]}"
[ "$build_rc" -eq 0 ] || die "setup.py build_ext failed although every object compiled (link error?): see the log"

SO=$(find "$TMP/lib" -name '_C*.so' | head -n 1)
[ -n "$SO" ] || die "no lsr_fast/_C*.so in $TMP/lib"

# ---- SASS for sm_80 and sm_90 -----------------------------------------------------------------
# cuobjdump is not part of a minimal toolkit; the nvidia-cuda-cuobjdump wheel (~300 KB) has it.
CUOBJDUMP="$TOOLKIT/bin/cuobjdump"
if [ ! -x "$CUOBJDUMP" ]; then
  CUOBJDUMP=$(find "$VENV/lib" -path '*/nvidia/*/bin/cuobjdump' -type f 2>/dev/null | head -n 1)
  if [ -z "$CUOBJDUMP" ]; then
    "$VENV/bin/pip" install --no-deps nvidia-cuda-cuobjdump >>"$VENV/pip-install.log" 2>&1 || true
    CUOBJDUMP=$(find "$VENV/lib" -path '*/nvidia/*/bin/cuobjdump' -type f 2>/dev/null | head -n 1)
  fi
fi
[ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ] || die "no cuobjdump (toolkit or nvidia-cuda-cuobjdump wheel): cannot check the SASS"
elf_list=$("$CUOBJDUMP" --list-elf "$SO")
no_sass=()
for src in csrc/cuda/*.cu; do
  name=$(basename "${src%.cu}")
  for sm in sm_80 sm_90; do
    grep -qF "$name.$sm.cubin" <<<"$elf_list" || no_sass+=("$name/$sm")
  done
done
[ "${#no_sass[@]}" -eq 0 ] || die "SASS missing from the extension for: ${no_sass[*]}"
say "SASS: every .cu has sm_80 and sm_90 cubins ($(grep -c cubin <<<"$elf_list") in all)"

# ---- load the extension: every op has a CUDA kernel -------------------------------------------
"$VENV/bin/python" - "$SO" <<'EOF' || die "the built extension does not load or lacks CUDA kernels"
import sys

import torch

torch.ops.load_library(sys.argv[1])  # RTLD_NOW: an unresolved symbol fails here
ops = ["hist_downsample", "pseudo_label_downsample", "class_feature_stats", "class_feature_stats_backward",
       "feature_terms", "feature_terms_backward", "maxsquare_loss", "maxsquare_loss_backward"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr_fast::{op}", "CUDA")]
cpu_missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr_fast::{op}", "CPU")]
print(f"[check_cuda_compile] loaded {sys.argv[1].rsplit('/', 1)[-1]}: CUDA kernels for {len(ops) - len(missing)}/{len(ops)} ops"
      + (f"; CPU kernels missing for: {', '.join(cpu_missing)}" if cpu_missing else "; CPU kernels for all"))
if missing:
    print("[check_cuda_compile] no CUDA kernel for: " + ", ".join(missing))
    sys.exit(1)
EOF

say "OK: all $(ls csrc/cuda/*.cu | wc -l) CUDA sources compiled for sm_80 and sm_90, the extension loads and registers every CUDA op ($(elapsed))"
