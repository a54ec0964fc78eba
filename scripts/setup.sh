#!/usr/bin/env bash
# Sets up .venv for this checkout: torch (CPU build 2.13.0 unless TORCH_SPEC says otherwise),
# triton (3.9.0 unless TRITON_SPEC says otherwise), the test/benchmark tools, and lsr_fast
# itself in editable mode with its C++ extension built.
# Sourced by scripts/run.sh and scripts/test.sh; safe to run again (it reuses .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# Pinned so the tests and CI's Triton compile check (which uses Triton internals) see one release.
TRITON_SPEC=${TRITON_SPEC:-triton==3.9.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "$TORCH_SPEC"
fi
# Triton: the kernels of backend="triton"; without a GPU the tests run them in its interpreter.
"${PIP[@]}" install "numpy>=1.24" "$TRITON_SPEC" "pytest>=7" "hypothesis>=6" expecttest "pytest-benchmark>=4" "setuptools>=64" wheel
# The trainer, datasets, plots and logs (no CPU torchvision exists, so the model is our own code).
"${PIP[@]}" install "pyyaml>=6" "pillow>=10" "opencv-python-headless>=4.8" "tqdm>=4" "tensorboard>=2.14" "matplotlib>=3.7" "scikit-learn>=1.3"
# --no-build-isolation: compile the extension against the torch installed above.
"${PIP[@]}" install --no-build-isolation --no-deps -e .
.venv/bin/python -c "import lsr_fast; print('lsr_fast backends:', lsr_fast.available_backends())"
