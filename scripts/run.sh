#!/usr/bin/env bash
# Set up, then run the main job on the built-in model (SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Compress the built-in model with the default recipe, save it under out/, and
# print base vs compressed on the wiki-v1 protocol (re-running replaces out/).
exec .venv/bin/slimlm compress --overwrite "$@"
