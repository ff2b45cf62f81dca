"""End-to-end prefill of a compressed checkpoint against the float model, in one process, interleaved.

    .venv/bin/python benchmarks/prefill.py CHECKPOINT [--model smollm2-135m] [--tokens 512] [--rounds 7]

Three rows timed in turn each round (so drift on a shared machine hits all
of them alike): the float model, the checkpoint with the weight dequantized
by the native library (``dequant.c``, the default), and the same checkpoint
with torch's elementwise dequantization (the library switched off for that
row only; the decode kernels already chosen stay). Both quantized rows must
give equal logits (the native pass is bit for bit the torch form); the run
stops (exit 1) if they do not. Prompt: random ids, one sequence, fast
decoder prefill with a cache, logits of the last position.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from slimlm.generation.decoder import make_decoder
from slimlm.io import load_compressed
from slimlm.kernels.native import build
from slimlm.models import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    decoders = {"float": make_decoder(load_model(args.model)[0]),
                "quantized": make_decoder(load_compressed(args.checkpoint)[0])}  # fmt: skip
    P = args.tokens
    ids = torch.randint(100, 40000, (1, P), generator=torch.Generator().manual_seed(0))
    state, off = build.native(), build.Native(reason="disabled for this row")
    rows = {"float": ("float", state), "quantized, native dequant": ("quantized", state),
            "quantized, torch dequant": ("quantized", off)}  # fmt: skip
    times: dict[str, list[float]] = {r: [] for r in rows}
    logits = {}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for row, (name, lib) in rows.items():
                build.reset(lib)
                dec = decoders[name]
                t0 = time.perf_counter()
                logits[row] = dec(ids, torch.arange(P)[None], dec.new_cache(1, P + 8), n_logits=1)
                if round_:
                    times[row].append(time.perf_counter() - t0)
    build.reset(state)
    if not torch.equal(logits["quantized, native dequant"], logits["quantized, torch dequant"]):
        print("the two dequantizations gave different logits", file=sys.stderr)
        return 1
    base = statistics.median(times["float"])
    print(f"prefill of {P} tokens, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| row | median ms | best ms | tok/s | vs float |\n|---|---|---|---|---|")
    for row, t in times.items():
        med = statistics.median(t)
        print(f"| {row} | {med * 1e3:.1f} | {min(t) * 1e3:.1f} | {P / med:.0f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
