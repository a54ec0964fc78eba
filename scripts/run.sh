#!/usr/bin/env bash
# The README's main command: set everything up, then run the main job on the built-in synthetic
# scenes: target-supervised, source-only and LSR runs, one comparison table, the latent-space
# figures. Each invocation writes a new folder under runs/ (nothing earlier is overwritten).
# Extra arguments are config overrides for `lsr-fast experiment`, e.g. train.steps=100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/lsr-fast experiment -c configs/synthetic.yaml "out_dir=runs/synthetic-$(date +%Y%m%d-%H%M%S)" "$@"
