"""Native C kernels (slimlm.kernels.native) against torch's int4 kernel, int8_grouped and float32 oneDNN.

Run as ``benchmarks/kernel_speed.py --native [--native-threads 1,2] [--native-rows 1,4] [--rounds 9]``. Per
built-in (SmolLM2-135M) shape -- fused q/k/v 960x576, o_proj 576x576, fused gate/up 3072x576, down 576x1536,
head 49152x576 -- and thread count, microseconds per call (best of interleaved samples, ~5 ms of calls each;
the machine is usually shared) of, all with float32 activations:

* ``native q4``: int4-g64 on ``int4_native_cpu`` (float32 accumulation);
* ``torch q4``: the same codes on ``int4_grouped_cpu`` (activations rounded to bfloat16);
* ``native q8``: int8-g32-sym (llama.cpp's Q8_0) on ``int8_native_cpu``;
* ``old q8``: the same codes on ``int8_grouped`` (dequantize, then ``F.linear``);
* ``f32``: the float32 weight through oneDNN's inner product (``slimlm.kernels.dense``'s fast path).

GB/s is weight bytes read per call / time (codes plus float16 scales and zeros). A native column that is not
available here stops the run rather than time another kernel under its name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimlm.formats import codec, parse_scheme
from slimlm.kernels import dense, get_kernel, relative_error
from slimlm.kernels.native import native
from _prefill import interleaved_ms  # benchmarks/ is on sys.path when a script runs

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # (out, in)
Q4, Q8 = parse_scheme("int4-g64"), parse_scheme("int8-g32-sym")
COLUMNS = {"native q4": ("int4_native_cpu", Q4), "torch q4": ("int4_grouped_cpu", Q4),
           "native q8": ("int8_native_cpu", Q8), "old q8": ("int8_grouped", Q8)}  # fmt: skip
BYTES_PER_WEIGHT = {"native q4": 0.5 + 4 / 64, "torch q4": 0.5 + 4 / 64, "native q8": 1 + 2 / 32,
                    "old q8": 1 + 2 / 32, "f32": 4.0}  # fmt: skip


def _call(name: str, scheme, W: torch.Tensor, x: torch.Tensor) -> Callable[[], object]:
    kernel, shape = get_kernel(name), tuple(W.shape)
    if not kernel.supports(scheme, shape, W.device):
        raise SystemExit(f"{name} cannot run {scheme!r} {shape} here ({native().reason or 'unsupported'})")
    packed = codec.pack(codec.quantize(W, scheme))
    t = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    err = relative_error(kernel.matmul(x, t, scheme, shape), F.linear(x, codec.dequantize(codec.unpack(packed,
                                                                                                     scheme, shape))))
    if err > 3e-2:  # against the same codes dequantized; bfloat16 activations (torch q4) allowed
        raise SystemExit(f"{name} disagrees with the float32 reference on {shape} (relative error {err:.1e})")
    return lambda: kernel.matmul(x, t, scheme, shape)


@torch.no_grad()
def row(m: int, n: int, k: int, rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    W, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)  # (N, K), (M, K)
    fns = {col: _call(name, scheme, W, x) for col, (name, scheme) in COLUMNS.items()}
    fns["f32"] = (lambda: dense._onednn(x, W, None)) if dense.onednn_available() else (lambda: F.linear(x, W))
    return {col: ms * 1e3 for col, ms in interleaved_ms(fns, rounds).items()}  # us


def run(*, rounds: int, threads: tuple[int, ...], rows: tuple[int, ...]) -> None:
    state = native()
    if state.lib is None:
        raise SystemExit(f"native kernels unavailable: {state.reason}")
    before = torch.get_num_threads()
    table = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            table.update({(t, m, n, k): row(m, n, k, rounds) for m in rows for (n, k) in SHAPES})
    finally:
        torch.set_num_threads(before)
    print(f"native AVX{state.isa}, torch={torch.__version__}; float32 activations; us per call, best of {rounds} "
          f"interleaved samples (GB/s = weight bytes / time)")  # fmt: skip
    cols = list(next(iter(table.values())))
    print(f"| threads | M x out x in | {' | '.join(cols)} |\n|" + "---|" * (len(cols) + 2))
    for (t, m, n, k), r in table.items():
        cells = [f"{r[c]:.1f} ({n * k * BYTES_PER_WEIGHT[c] / r[c] / 1e3:.1f})" for c in cols]
        print(f"| {t} | {m}x{n}x{k} | " + " | ".join(cells) + " |")
    print("\nspeed-ups (>1 = native faster): native q4 vs torch q4, vs f32; native q8 vs old q8, vs f32")
    print("| threads | M x out x in | q4/torch | q4/f32 | q8/old | q8/f32 |\n|---|---|---|---|---|---|")
    for (t, m, n, k), r in table.items():
        ratios = (r["torch q4"] / r["native q4"], r["f32"] / r["native q4"], r["old q8"] / r["native q8"],
                  r["f32"] / r["native q8"])  # fmt: skip
        print(f"| {t} | {m}x{n}x{k} | " + " | ".join(f"{v:.2f}x" for v in ratios) + " |")
