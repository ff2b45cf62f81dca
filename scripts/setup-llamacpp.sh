#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's Python binding) into .venv, for benchmarks/engines.py only:
# slimlm itself never imports it, and CI does not install it (no prebuilt wheel: it compiles llama.cpp
# from source, ~4 minutes of wall time on 2 cores, ~13 minutes of CPU).
#
#   scripts/setup.sh && scripts/setup-llamacpp.sh
#
# Idempotent: a second run with this script unchanged returns at once. A run after the script changed
# (another version or other build flags) uninstalls and rebuilds, bypassing pip's wheel cache, which
# would otherwise hand back the wheel built with the old flags.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "error: no .venv here; run scripts/setup.sh first" >&2
  exit 2
fi

# Build flags. The default build (GGML_NATIVE=ON: compile for the build machine's CPU as its CPUID
# describes it) crashed on the first forward pass with a general protection fault in libggml-cpu on
# the machines this project runs on: their CPUs advertise AMX, which the kernel does not enable (no
# amx flags in /proc/cpuinfo). So name the instruction sets instead, AMX off, and turn on only those
# the kernel reports (on those machines that is exactly AVX2, AVX-512, AVX-512 VNNI, FMA, F16C).
has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null && echo ON || echo OFF; }
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=$(has avx2) -DGGML_AVX512=$(has avx512f)"
CMAKE_ARGS+=" -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
CMAKE_ARGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

stamp=.venv/.slimlm-llamacpp
want="$( (cat scripts/setup-llamacpp.sh; echo "$CMAKE_ARGS") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && \
   "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  exit 0
fi

for tool in cc c++; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: building llama.cpp needs a C/C++ compiler ($tool not found): e.g. apt-get install build-essential" >&2
    exit 2
  fi
done
pip=("$PY" -m pip --disable-pip-version-check)
# scikit-build-core (llama-cpp-python's build backend) needs cmake >= 3.21; take it from PyPI when the
# system has none or an older one, and put .venv/bin first so the build finds it.
if ! cmake_v="$(cmake --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+')" || \
   [ "$(printf '%s\n3.21\n' "$cmake_v" | sort -V | head -1)" != "3.21" ]; then
  "${pip[@]}" install -q "cmake>=3.21"
fi
export PATH="$PWD/.venv/bin:$PATH"

rm -f "$stamp"
"${pip[@]}" uninstall -q -y llama-cpp-python 2>/dev/null || true
echo "building llama-cpp-python $VERSION with CMAKE_ARGS=$CMAKE_ARGS (takes minutes)" >&2
"${pip[@]}" install -q --no-cache-dir "llama-cpp-python==$VERSION"

# A smoke test that runs a forward pass (the native build imported fine and crashed only there): a tiny
# random llama exported by slimlm as F16 GGUF, a few tokens evaluated.
"$PY" - <<'EOF'
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp import Llama

from slimlm.export import export
from slimlm.io import save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer

with tempfile.TemporaryDirectory() as d:
    model = tiny_model("llama")
    ckpt = save_compressed(model, tiny_tokenizer(model.config.vocab_size), Path(d) / "ckpt")
    path = export(ckpt, Path(d) / "tiny.gguf", format="gguf", float_type="f16")
    llm = Llama(model_path=str(path), n_ctx=32, logits_all=True, n_threads=1, verbose=False)
    llm.eval(list(range(3, 19)))
    assert np.isfinite(np.asarray(llm.scores[:16])).all(), "llama.cpp returned non-finite logits"
    llm.close()
print("llama-cpp-python works: a forward pass ran")
EOF
echo "$want" > "$stamp"
