#!/usr/bin/env bash
# The README's test command: set everything up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Backends the suite requires (checked by tests/conftest.py before anything runs): should the C++
# extension fail to build, or Triton fail to interpret, the run fails naming the backend and
# lsr_fast.available_backends()'s reason, instead of skipping every case of that backend.
# Set LSR_FAST_REQUIRE_BACKENDS=cpp,cuda,triton on a GPU machine with the CUDA build, or to the
# empty string to require nothing.
export LSR_FAST_REQUIRE_BACKENDS=${LSR_FAST_REQUIRE_BACKENDS-cpp,triton}
exec .venv/bin/python -m pytest "$@"
