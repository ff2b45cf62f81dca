#!/usr/bin/env bash
# Set up, then run the test suite (includes one test on the real built-in model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
