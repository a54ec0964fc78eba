#!/usr/bin/env bash
# The install routes of docs/install.md, end to end, in a new virtualenv with the same torch as
# .venv (installed from the local wheel/index, like any `pip install torch==X`):
#
#   1. `pip wheel --no-build-isolation .` with .venv: the wheel must hold lsr_fast/_C*.so, its
#      _build_info.py and the sources (lsr_fast/_csrc). setup.py's build folder build/ keeps the
#      ninja objects of earlier builds (scripts/setup.sh's editable install included): relink only.
#   2. that wheel installed into the new venv: every op on the cpp backend against the reference
#      (scripts/install_smoke.py), the extension loaded from the package, compiling on first use off.
#   3. the plain `pip install .` (pip's isolated build, no torch in it): the package must say so in
#      its _build_info.py, and the first import compiles the kernels into an empty cache (the
#      minutes of this check); the same smoke test, the extension loaded from the cache.
#   4. an sdist (setup.py sdist) installed over it: it must ship the sources, which give the same
#      cache key, so its first import loads the build of step 3 without compiling.
#
# The virtualenv lives in build/install-check-venv and is reused by later runs (creating it costs
# about a minute of copying torch, deleting it another): each run uninstalls lsr_fast from it
# and checks that nothing of it is left, so it is as clean as a new one. It is made anew when
# missing, when its torch is not .venv's, or with FRESH_VENV=1.
#
# Environment: PY (default .venv/bin/python), FRESH_VENV=1, KEEP_INSTALL_CHECK=1 keeps the
# temporary folder (wheel, caches, build logs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PY:-.venv/bin/python}
start=$SECONDS
say() { printf '[check_install %4ss] %s\n' "$((SECONDS - start))" "$*"; }
die() { printf '[check_install] ERROR: %s\n' "$*" >&2; exit 1; }
quiet_pip() { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lsr_fast-install.XXXXXX")
if [ "${KEEP_INSTALL_CHECK:-0}" = "1" ]; then say "kept: $TMP"; else trap 'rm -rf "$TMP"' EXIT; fi
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')

# ---- 1. the wheel -------------------------------------------------------------------------------
"$PY" -m pip wheel --no-build-isolation --no-deps -q . -w "$TMP/dist" >"$TMP/wheel.log" 2>&1 ||
  { tail -40 "$TMP/wheel.log"; die "pip wheel failed (log above)"; }
WHEEL=$(ls "$TMP"/dist/lsr_fast-*.whl)
"$PY" - "$WHEEL" <<'EOF' || die "the wheel lacks the compiled extension or its build record"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("lsr_fast/_C.") and n.endswith(".so") for n in names), "no lsr_fast/_C*.so"
assert "lsr_fast/_build_info.py" in names and "lsr_fast/_csrc/ops.cpp" in names, "no _build_info.py or _csrc"
EOF
say "wheel built: $(basename "$WHEEL")"

# ---- 2. a venv with the same torch and nothing of lsr_fast, then the wheel ---------------------------
VENV="$ROOT/build/install-check-venv"
V="$VENV/bin/python"
if [ "${FRESH_VENV:-0}" = "1" ] || ! "$V" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH')" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$V" -m pip install -q "torch==$TORCH" 2>&1 | quiet_pip
  say "new venv $VENV with torch $TORCH"
else
  "$V" -m pip uninstall -y -q lsr_fast 2>/dev/null || true
fi
(cd "$TMP" && "$V" -c "import importlib.util as u; assert u.find_spec('lsr_fast') is None") ||
  die "lsr_fast is still importable in $VENV before installing (FRESH_VENV=1 remakes it)"
"$V" -m pip install -q "$WHEEL" 2>&1 | quiet_pip
say "wheel installed into $VENV (torch $TORCH)"
cd "$TMP"  # away from the source tree: `import lsr_fast` is the installed one
LSR_FAST_JIT=0 LSR_FAST_CACHE_DIR="$TMP/cache-wheel" "$V" "$ROOT/scripts/install_smoke.py" --origin package ||
  die "the wheel's extension failed the smoke test"
[ ! -e "$TMP/cache-wheel" ] || die "the wheel's import compiled into the cache although its extension fits"
say "wheel route ok"

# ---- 3. plain `pip install .` (isolated build) + compile on first use ----------------------------
"$V" -m pip uninstall -y -q lsr_fast
"$V" -m pip install -q "$ROOT" 2>&1 | quiet_pip
"$V" - <<'EOF' || die "the isolated build did not record why it has no extension"
import importlib.util, os
folder = os.path.dirname(importlib.util.find_spec("lsr_fast").origin)
assert not [n for n in os.listdir(folder) if n.startswith("_C.")], "an isolated build has no torch: no _C expected"
text = open(os.path.join(folder, "_build_info.py")).read()
assert "'cause': 'isolated'" in text, text
assert os.path.isfile(os.path.join(folder, "_csrc", "ops.cpp")), "no lsr_fast/_csrc"
EOF
say "plain pip install . done (no extension, cause recorded); first import compiles ..."
LSR_FAST_CACHE_DIR="$TMP/cache" "$V" "$ROOT/scripts/install_smoke.py" --origin cache ||
  die "compiling on first use failed the smoke test (log: $TMP/cache/*/build.log, KEEP_INSTALL_CHECK=1 keeps it)"
LSR_FAST_CACHE_DIR="$TMP/cache" "$V" -m lsr_fast.build >"$TMP/build-report.txt" 2>&1 ||
  { cat "$TMP/build-report.txt"; die "python -m lsr_fast.build failed after the first-use compile"; }
grep -q "built already" "$TMP/build-report.txt" || { cat "$TMP/build-report.txt"; die "lsr_fast.build compiled again"; }
say "plain install route ok (compiled on first use, reused by python -m lsr_fast.build)"

# ---- 4. the sdist ------------------------------------------------------------------------------------
cd "$ROOT"
LSR_FAST_EXT=0 "$PY" setup.py -q sdist -d "$TMP/sdist" >"$TMP/sdist.log" 2>&1 ||
  { tail -30 "$TMP/sdist.log"; die "setup.py sdist failed"; }
cd "$TMP"
"$V" -m pip install -q --force-reinstall --no-deps "$TMP"/sdist/lsr_fast-*.tar.gz 2>&1 | quiet_pip
LSR_FAST_JIT=0 LSR_FAST_CACHE_DIR="$TMP/cache" "$V" "$ROOT/scripts/install_smoke.py" --origin cache ||
  die "the sdist install did not find the first-use build of the same sources"
say "sdist route ok; all install checks passed"
