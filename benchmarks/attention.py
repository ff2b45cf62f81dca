"""Decode attention per call: the native kernel over float32, float16 and bfloat16 KV caches, and torch's SDPA.

    .venv/bin/python benchmarks/attention.py [--threads 2] [--keys 128,512,2048] [--layers 30] [--reps 50]

One query token of SmolLM2-135M's shape (9 query heads over 3 KV heads of 64) attends over ``keys`` cached
keys, as the fast decoder's one-token step does (``slimlm.kernels.native.attention.decode_attention``, a
``[:, :, :keys]`` view of a longer static cache). Each of ``--layers`` layers has its own cache, called in
turn, so the caches of a 30-layer model do not all stay in cache memory between steps (they may at small
``keys``), and between two calls the layer's share of ``--weights-mb`` is read, untimed, as a real step
reads a layer's weights between two attentions. Reported: microseconds per call (median
of ``--reps`` rounds over all layers), the K/V bytes a call reads and the rate that makes, and the
kernel over float32 K/V against torch's ``scaled_dot_product_attention`` on the same float32 views.
Shared machines: compare the ratios within one run; the thread count is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from slimlm.kernels import native
from slimlm.kernels.native.attention import decode_attention

HQ, HKV, D = 9, 3, 64


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q.view(1, HKV, HQ // HKV, D), k, v, scale=scale)


def _time(fn, q, caches, keys: int, reps: int, weights: torch.Tensor | None) -> float:
    """Median microseconds per call over rounds of one call per layer; before each call (untimed) that
    layer's share of ``weights`` is read, as a decode step reads a layer's weights between two attentions."""
    views = [(k[:, :, :keys], v[:, :, :keys]) for k, v in caches]
    share = None if weights is None else weights.numel() // len(views)
    for k, v in views:  # warm-up
        fn(q, k, v, 0.125)
    rounds = []
    for _ in range(reps):
        spent = 0.0
        for i, (k, v) in enumerate(views):
            if share:
                weights[i * share : (i + 1) * share].sum()
            t0 = time.perf_counter()
            fn(q, k, v, 0.125)
            spent += time.perf_counter() - t0
        rounds.append(spent / len(views))
    return statistics.median(rounds) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keys", default="128,512,2048")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--weights-mb", type=float, default=66.0,
                   help="MB read between calls over all layers, untimed (default 66: SmolLM2-135M's int4 blocks); "
                        "0: the caches stay in cache memory as far as they fit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native library does not load here (see slimlm info); nothing to time")
    gen = torch.Generator().manual_seed(0)
    keys = [int(k) for k in args.keys.split(",")]
    q = torch.randn(1, HQ, 1, D, generator=gen)
    weights = torch.randn(int(args.weights_mb * 2**20) // 4, generator=gen) if args.weights_mb > 0 else None
    full = [(torch.randn(1, HKV, max(keys) + 16, D, generator=gen), torch.randn(1, HKV, max(keys) + 16, D,
                                                                               generator=gen))
            for _ in range(args.layers)]  # fmt: skip
    print(f"\n## decode attention, {torch.get_num_threads()} threads, {args.layers} layers, {HQ} query heads over "
          f"{HKV} KV heads of {D}, {args.weights_mb:g} MB of weights read between calls\n")
    head = ("keys", "SDPA float32 us", "native float32 us", "native / SDPA", "native float16 us",
            "native bfloat16 us", "float16 / float32", "float32 GB/s", "float16 GB/s")
    print(" | ".join(head) + "\n" + " | ".join("---" for _ in head))
    for n in keys:
        us = {"sdpa": _time(_sdpa, q, full, n, args.reps, weights)}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            caches = [(k.to(dtype), v.to(dtype)) for k, v in full]
            us[dtype] = _time(decode_attention, q, caches, n, args.reps, weights)
        nbytes = {dt: 2 * HKV * n * D * dt.itemsize for dt in (torch.float32, torch.float16)}
        row = (n, f"{us['sdpa']:.1f}", f"{us[torch.float32]:.1f}", f"{us['sdpa'] / us[torch.float32]:.2f}x faster",
               f"{us[torch.float16]:.1f}", f"{us[torch.bfloat16]:.1f}", f"{us[torch.float16] / us[torch.float32]:.2f}x",
               f"{nbytes[torch.float32] / us[torch.float32] / 1e3:.1f}",
               f"{nbytes[torch.float16] / us[torch.float16] / 1e3:.1f}")  # fmt: skip
        print(" | ".join(str(c) for c in row), flush=True)


if __name__ == "__main__":
    main()
