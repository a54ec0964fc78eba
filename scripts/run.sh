#!/usr/bin/env bash
# The README's main command: set everything up, then run the main job. Until the trainer
# lands this is `lsr-fast demo`: every op and the regulariser on a built-in example.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/lsr-fast demo "$@"
