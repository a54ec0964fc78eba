#!/usr/bin/env bash
# The work a session with a lent GPU does, in stages that each fit one call of the device tool
# (10 minutes a call, 30 minutes a session; see benchmarks/README.md, "On a lent GPU"):
#
#   bash scripts/gpu_session.sh build           # build the CUDA extension in place; print the backends
#   bash scripts/gpu_session.sh test [ARGS]     # the paper-shape GPU tests, then the whole suite (ARGS go to pytest)
#   bash scripts/gpu_session.sh sanitize [ARGS] # compute-sanitizer memcheck + racecheck on the CUDA ops
#   bash scripts/gpu_session.sh bench PART      # one part of the benchmark: losses, ops, step or paths
#
# Every stage builds first unless a build of the same csrc/ and setup.py is there (a fresh
# machine is bare), so the stages can run in any order, one per call. Logs and reports
# go to $OUT (the folder the device tool brings back), else ./gpu-out. It uses the machine's
# python3 and its packages as they are; nothing is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stage=${1:-}
[ -n "$stage" ] || { sed -n '2,13p' "$0"; exit 2; }
shift

say() { printf '[gpu_session %s] %s\n' "$stage" "$*"; }

built_extension() { compgen -G "lsr_fast/_C*.so" | head -n 1 || true; }
# A hash of what the build reads: each call re-sends the tree (new mtimes), so a warm machine's
# build is reused only when the sources are the same.
STAMP=build/gpu-session.stamp
sources_hash() { cat setup.py lsr_fast/_build.py $(find csrc -type f | LC_ALL=C sort) | sha1sum | cut -d' ' -f1; }

build() {
  local so
  so=$(built_extension)
  if [ -n "$so" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$(sources_hash)" ]; then
    say "extension $so is up to date"
  else
    # Only this GPU's architecture (unless TORCH_CUDA_ARCH_LIST says otherwise): a minute, not four.
    local arch=${TORCH_CUDA_ARCH_LIST:-}
    [ -n "$arch" ] || arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    say "building the extension for compute capability $arch ..."
    local start=$SECONDS
    LSR_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 ||
      { tail -n 60 "$OUT/build.log"; say "build failed (log: build.log)"; exit 1; }
    mkdir -p build && sources_hash >"$STAMP"
    say "built in $((SECONDS - start)) s"
  fi
  "$PY" - <<'EOF'
import torch, lsr_fast
backends = lsr_fast.available_backends()
print("backends:", backends)
missing = [name for name in ("cpp", "cuda", "triton") if backends[name] != "available"]
if missing:
    raise SystemExit(f"not usable on this GPU machine: {', '.join(missing)}")
EOF
}

describe_machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
names = ["torch", "triton", "numpy", "pytest", "pytest-benchmark", "hypothesis", "pyyaml", "matplotlib", "pytest-xdist"]
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = "missing"
print("python", platform.python_version(), versions)
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
}

case "$stage" in
  build)
    describe_machine | tee "$OUT/machine.txt"
    build
    ;;
  test)
    build
    # Parallel workers when pytest-xdist is there: the CPU-side tests and Triton's compilations
    # spread over the cores; every worker shares the one GPU.
    workers=()
    if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi
    set -o pipefail
    # Every backend must be usable on the GPU machine; the suite refuses to start otherwise.
    export LSR_FAST_REQUIRE_BACKENDS=${LSR_FAST_REQUIRE_BACKENDS-cpp,cuda,triton}
    # First the paper-shape GPU tests, in one process (their CPU float64 references are cached
    # and shared between cases); the rest of the suite runs even if they fail.
    paper=0
    "$PY" -m pytest tests/test_gpu_paper_shape.py tests/test_gpu_paper_shape_step.py -q -p no:cacheprovider --maxfail=50 --durations=20 \
      --junitxml="$OUT/junit-paper-shape.xml" "$@" 2>&1 | tee "$OUT/pytest-paper-shape.log" || paper=$?
    [ "$paper" != 5 ] || paper=0  # 5: ARGS selected none of them
    "$PY" -m pytest tests -q -p no:cacheprovider "${workers[@]}" --ignore=tests/test_gpu_paper_shape.py --ignore=tests/test_gpu_paper_shape_step.py --maxfail=50 \
      --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest.log"
    exit "$paper"
    ;;
  sanitize)
    build
    # CUDA backend only: memcheck (out-of-bounds and misaligned accesses) and racecheck
    # (shared-memory hazards) over every CUDA op's tests, small inputs and the paper's shape
    # (ARGS go to pytest: a later -k narrows the selection, e.g. -k "cuda-cuda and det-off").
    tests=(tests/test_gpu_paper_shape.py tests/test_gpu_paper_shape_step.py tests/test_hist_downsample.py tests/test_class_feature_stats.py
           tests/test_feature_losses.py tests/test_maxsquare.py)
    for tool in memcheck racecheck; do
      say "compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
        "$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider -x -k "cuda-cuda" "$@" 2>&1 |
        tee "$OUT/sanitize-$tool.log" | tail -n 25 || say "$tool: errors (see sanitize-$tool.log)"
    done
    ;;
  bench)
    part=${1:-}
    # losses: the fused losses against the reference and torch.compile(reference) (the compile
    #   goal; compile cases compile first, so they stay in this part only);
    # ops: every other op, reference vs cuda vs triton, paper shapes and small;
    # step: the DeepLabV2-R101 training step at the paper's sizes, with and without LSR;
    # paths: the CUDA kernels' performance paths (scripts/cuda_paths_bench.py, docs/cuda.md):
    #   unaligned 16-byte loads at 91x161 against aligned 96x160, shared-memory accumulators
    #   beyond 48 KB (float64, C > 32), deterministic mode without the NaN fill (about 2 minutes).
    if [ "$part" = paths ]; then
      shift
      build
      set -o pipefail
      "$PY" scripts/cuda_paths_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench-paths.log"
      exit
    fi
    case "$part" in
      losses) args=(--ops losses --backends reference,compile,cuda,triton --shapes gta5,synthia,cityscapes) ;;
      ops) args=(--ops hist_downsample,pseudo_label_downsample,class_feature_stats,maxsquare_loss,regularizer
                 --backends reference,cuda,triton --shapes gta5,synthia,cityscapes,small) ;;
      step) args=(--ops train_step --backends reference,cuda,triton --step-size paper) ;;
      *) echo "bench PART: losses, ops, step or paths" >&2; exit 2 ;;
    esac
    shift
    build
    set -o pipefail
    "$PY" -m lsr_fast.bench --device cuda "${args[@]}" --time-budget 8 --out "$OUT" "$@" 2>&1 | tee "$OUT/bench-$part.log"
    ;;
  *)
    echo "unknown stage '$stage': build, test, sanitize or bench PART" >&2
    exit 2
    ;;
esac
