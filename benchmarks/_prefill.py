"""Float32 prefill through the quantized kernels: the old paths against the new (issue 18).

Run as ``benchmarks/kernel_speed.py --prefill``. Per (rows, out x in) of SmolLM2-135M's linears, milliseconds per
call (the best of interleaved samples, each ~5 ms of repeated calls: the machine is usually shared, and the
best sample is the one least disturbed) of:

* ``fp32``: ``F.linear`` on the float32 weight (the float model);
* ``int4 old`` / ``int4 new``: int4-g64 with the prefill GEMM forced to float32 (before: dequantize, float32
  GEMM) / to bfloat16 (at one row both are torch's int4 kernel: a noise check);
* ``int8g old`` / ``int8g new``: int8-g64 asymmetric on the generic reference path (before: no kernel) / on
  ``int8_grouped`` with the prefill GEMM in bfloat16;
* ``int8 old`` / ``int8 new``: int8 per-row symmetric, prefill GEMM in float32 / bfloat16.

A model's prefill speed is the eval protocol's (``slimlm eval``, 512-token prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel, PerGroup
from slimlm.formats.scheme import IntScheme
from slimlm.kernels import REFERENCE, select_weight_kernel, tune

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of q/o, k/v, gate/up, down
HEAD = (49152, 576)
ROWS = (1, 512)
INT4 = IntScheme(4, granularity=PerGroup(64))
INT8G = IntScheme(8, granularity=PerGroup(64))
INT8 = IntScheme(8, symmetric=True, granularity=PerChannel())
SAMPLE_S = 5e-3


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best ms per call of each function: warmed up, then ``rounds`` samples each, taken in turn."""
    loops = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        loops[name] = max(1, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / loops[name] * 1e3)
    return {name: min(s) for name, s in samples.items()}


def _forced(path: str) -> tune.Tuner:
    return tune.Tuner(tune.KernelSettings.parse(f"fixed,prefill:{path}"))


def _under(tuner_: tune.Tuner, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``tuner_`` installed (a global swap: the old and new paths interleave call by call)."""
    return lambda: (tune.reset(tuner_), fn())[1]


def _layer(scheme: IntScheme, W: torch.Tensor):
    shape = tuple(W.shape)
    packed = codec.pack(codec.quantize(W, scheme))
    kernel = select_weight_kernel(scheme, shape, W.device)
    return kernel, kernel.prepare(packed, scheme, shape, dtype=torch.float32), packed, shape


def _bind(fn: Callable, *args: object) -> Callable[[], object]:
    return lambda: fn(*args)


@torch.no_grad()
def row(m: int, n: int, k: int, rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    W, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)  # (N, K), (M, K)
    old, new = _forced("f32"), _forced("bf16")
    fns: dict[str, Callable[[], object]] = {"fp32": lambda: F.linear(x, W)}
    for name, scheme in (("int4", INT4), ("int8g", INT8G), ("int8", INT8)):
        kernel, t, packed, shape = _layer(scheme, W)
        fast = _bind(kernel.matmul, x, t, scheme, shape)
        # int8 per group had no kernel before: its old path is the generic reference
        fns[f"{name} old"] = _bind(REFERENCE.matmul, x, packed, scheme, shape) if name == "int8g" else _under(old, fast)
        fns[f"{name} new"] = _under(new, fast)
    try:
        return interleaved_ms(fns, rounds)
    finally:
        tune.reset()


def run(*, rounds: int, lm_head: bool) -> None:
    shapes = SHAPES + ([HEAD] if lm_head else [])
    print(f"float32 activations, threads={torch.get_num_threads()}, torch={torch.__version__}; ms per call, best "
          f"of {rounds} interleaved samples")  # fmt: skip
    table = {(m, n, k): row(m, n, k, rounds) for m in ROWS for (n, k) in shapes}
    cols = list(next(iter(table.values())))
    print(f"| M x out x in | {' | '.join(cols)} |\n|" + "---|" * (len(cols) + 1))
    for (m, n, k), r in table.items():
        print(f"| {m}x{n}x{k} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    print("\nspeed-ups (>1 = faster): new vs old, and new vs fp32, per format")
    formats = ("int4", "int8g", "int8")
    print("| M x out x in | " + " | ".join(f"{f} new/old | {f} vs fp32" for f in formats) + " |")
    print("|" + "---|" * (2 * len(formats) + 1))
    for (m, n, k), r in table.items():
        ratios = [v for f in formats for v in (r[f"{f} old"] / r[f"{f} new"], r["fp32"] / r[f"{f} new"])]
        print(f"| {m}x{n}x{k} | " + " | ".join(f"{v:.2f}x" for v in ratios) + " |")
