#!/usr/bin/env bash
# The GPU checks, for a session that is lent a CUDA machine (issue 13's GPU item, issue 18's GPU rows).
# Runs on that machine's own python3 (its torch and transformers), from the repository root:
#   bash scripts/gpu-check.sh [OUT_DIR]
# 1. installs the wheels carried in .whl/ (packages the machine's image lacks) into /tmp/site. Make them here first
#    (git-ignored through .git/info/exclude: echo /.whl/ >> .git/info/exclude), for the image's Python 3.12:
#      for p in greenlet==3.5.6 gguf==0.19.0 compressed-tensors==0.20.1 peft==0.21.2 pydantic==2.14.4 \
#               pydantic_core==2.50.5 loguru==0.7.3 annotated-types typing-inspection typing_extensions==4.16.0; do
#        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $p; done
#    and name .whl in the device call's carry;
# 2. the device-parametrised tests on CUDA (every test id holding "cuda") -> OUT/pytest-cuda.txt;
# 3. benchmarks/gpu.py (bandwidth, int8/int4 GEMV, 2:4 sparse, compressed-tensors load, decode, CUDA graphs)
#    -> OUT/gpu.md.
set -u
OUT_DIR=${1:-${OUT:-out/gpu}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 SLIMLM_CACHE=/tmp/slimlm-cache HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  nproc; } 2>&1 | tee "$OUT_DIR/env.txt"
# GPU_TESTS / GPU_SECTIONS narrow a rerun (e.g. GPU_TESTS=tests/prune/test_sparse_linear.py GPU_SECTIONS=sparse24)
timeout "${PYTEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -n 8 -k cuda \
  ${GPU_TESTS:-tests/nn tests/formats tests/prune/test_sparse_linear.py tests/generation/test_graphs.py} 2>&1 \
  | tee "$OUT_DIR/pytest-cuda.txt" | tail -n 40
timeout "${BENCH_TIMEOUT:-270}" python3 benchmarks/gpu.py --out "$OUT_DIR" --deadline "${BENCH_DEADLINE:-200}" \
  --sections "${GPU_SECTIONS:-bandwidth,gemv,int8c,sparse24,ct,graphs,decode}" 2>&1 \
  | tail -n 80 > "$OUT_DIR/gpu-log.txt"
echo "done"
