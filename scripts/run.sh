#!/usr/bin/env bash
# Set up, then run the main job on the built-in model (SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slimlm eval "$@"
