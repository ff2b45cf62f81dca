"""Kernel speed table: float GEMM/GEMV vs slimlm's quantized fast paths and their references.

    .venv/bin/python benchmarks/kernel_speed.py [--device cpu] [--threads N]
    .venv/bin/python benchmarks/kernel_speed.py --prefill [--rounds 9] [--lm-head]
    .venv/bin/python benchmarks/kernel_speed.py --native [--native-threads 1,2] [--native-rows 1] [--rounds 9]

Milliseconds per call, median of repeats after warm-up, all from one run.
Quantized weight-only kernels take bfloat16 activations (what a served model
runs in); "ref" is the reference path of the same codes (dequantize per call,
then ``F.linear``). W8A8 quantizes the activations per token inside the call.
A column whose fast kernel is not available here, or fails its first-use
check against the reference, stops the run (exit 1) rather than time the
reference under the kernel's name.

``--prefill`` times float32 activations instead, old path against new, on
the built-in model's shapes at 1 and 512 rows (:mod:`benchmarks._prefill`),
interleaved. ``--native`` times the native C kernels against torch's int4
kernel, ``int8_grouped`` and float32 oneDNN per built-in shape, at each
thread count in one run (:mod:`benchmarks._native`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel, PerGroup
from slimlm.formats.scheme import IntScheme
from slimlm.kernels import REFERENCE, W8A8_REFERENCE, select_w8a8_kernel, select_weight_kernel
from _fast import expect_fast_kernel  # benchmarks/ is on sys.path when a script runs
from _native import run as run_native
from _prefill import run as run_prefill

SHAPES = [(1, 4096, 4096), (1, 576, 1536), (512, 576, 1536), (512, 4096, 4096)]  # (M, K, N)
INT8 = IntScheme(8, symmetric=True, granularity=PerChannel())
INT4 = {g: IntScheme(4, symmetric=False, granularity=PerGroup(g)) for g in (64, 32)}


def time_ms(fn: Callable[[], object], *, budget_s: float = 0.6, min_reps: int = 5, max_reps: int = 50) -> float:
    """Median wall time of ``fn`` in ms after two warm-up calls."""
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _weight_fns(scheme, W, x, *, w8a8: bool = False) -> tuple[Callable, Callable, str]:
    shape = tuple(W.shape)
    packed = codec.pack(codec.quantize(W, scheme))
    fast = (select_w8a8_kernel if w8a8 else select_weight_kernel)(scheme, shape, W.device)
    ref = W8A8_REFERENCE if w8a8 else REFERENCE
    tf = fast.prepare(packed, scheme, shape, dtype=x.dtype)
    tr = ref.prepare(packed, scheme, shape, dtype=x.dtype)
    expect_fast_kernel(fast, x, tf, scheme, shape, f"{'w8a8' if w8a8 else scheme!r} {tuple(x.shape)}x{shape}")
    return (lambda: fast.matmul(x, tf, scheme, shape)), (lambda: ref.matmul(x, tr, scheme, shape)), fast.name


@torch.no_grad()
def bench_shape(m: int, k: int, n: int, device: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, k, generator=g).to(device)  # (N, K)
    x = torch.randn(m, k, generator=g).to(device)  # (M, K)
    xb, Wb = x.bfloat16(), W.bfloat16()
    row = {"fp32": time_ms(lambda: F.linear(x, W)), "bf16": time_ms(lambda: F.linear(xb, Wb))}
    fast, ref, _ = _weight_fns(INT8, W, xb)
    row["int8"], row["int8 ref"] = time_ms(fast), time_ms(ref)
    for gs, scheme in INT4.items():
        fast, ref, _ = _weight_fns(scheme, W, xb)
        row[f"int4 g{gs}"], row[f"int4 g{gs} ref"] = time_ms(fast), time_ms(ref)
    fast, ref, _ = _weight_fns(INT8, W, xb, w8a8=True)
    row["w8a8"], row["w8a8 ref"] = time_ms(fast), time_ms(ref)
    return row


# Weight bytes one call reads, per weight: codes plus fp16 scales (and zeros for asymmetric groups).
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4 g64": 0.5 + 4 / 64, "int4 g32": 0.5 + 4 / 32,
                    "w8a8": 1.0}  # fmt: skip
MACHINE_GBPS = 35.0  # measured read bandwidth of this machine (EVAL_PROTOCOL.md)


def bandwidth_table(rows: dict) -> list[str]:
    """Achieved GB/s = weight bytes / time, for the memory-bound GEMV rows (M = 1)."""
    cols = list(BYTES_PER_WEIGHT)
    out = [f"\nachieved weight bandwidth, GB/s (M = 1; this machine reads ~{MACHINE_GBPS:.0f} GB/s)",
           f"| K x N | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 1)]  # fmt: skip
    for (m, k, n), r in rows.items():
        if m == 1:
            gbps = [k * n * BYTES_PER_WEIGHT[c] / (r[c] * 1e-3) / 1e9 for c in cols]
            out.append(f"| {k}x{n} | " + " | ".join(f"{v:.1f}" for v in gbps) + " |")
    return out


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prefill", action="store_true", help="float32 prefill: old path vs new (CPU)")
    parser.add_argument("--rounds", type=int, default=9, help="--prefill: interleaved rounds per table row")
    parser.add_argument("--lm-head", action="store_true", help="--prefill: also the 49152x576 head")
    parser.add_argument("--native", action="store_true", help="native C kernels vs torch int4 and float32 (CPU)")
    parser.add_argument("--native-threads", default="1,2", help="--native: thread counts, comma-separated")
    parser.add_argument("--native-rows", default="1", help="--native: activation rows M, comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.native:
        run_native(rounds=args.rounds, threads=_ints(args.native_threads), rows=_ints(args.native_rows))
        return
    if args.prefill:
        run_prefill(rounds=args.rounds, lm_head=args.lm_head)
        return
    rows = {shape: bench_shape(*shape, args.device) for shape in SHAPES}
    cols = list(next(iter(rows.values())))
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}  (ms, median)")
    print(f"| M x K x N | {' | '.join(cols)} |")
    print("|" + "---|" * (len(cols) + 1))
    for (m, k, n), row in rows.items():
        print(f"| {m}x{k}x{n} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    print("\nratios (>1 = faster): int8 vs ref, int8 vs bf16, int4 g64 vs ref, int4 g64 vs bf16, w8a8 vs bf16")
    for (m, k, n), r in rows.items():
        ratios = [r["int8 ref"] / r["int8"], r["bf16"] / r["int8"], r["int4 g64 ref"] / r["int4 g64"],
                  r["bf16"] / r["int4 g64"], r["bf16"] / r["w8a8"]]  # fmt: skip
        print(f"| {m}x{k}x{n} | " + " | ".join(f"{v:.2f}x" for v in ratios) + " |")
    print("\n".join(bandwidth_table(rows)))


if __name__ == "__main__":
    main()
