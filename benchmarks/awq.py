"""AWQ vs round-to-nearest on the built-in model, protocol wiki-v1.

    .venv/bin/python benchmarks/awq.py [--schemes int4-g64,int3-g64] [--samples 32] [--tokens 8192]
                                       [--rows 4096] [--speed]

For each scheme: RTN and AWQ applied to a fresh copy of the base model,
measured in-process against the base (perplexity, KL divergence to the base,
top-1 agreement, bits per weight) plus the seconds compression took.
Calibration: ``--samples`` windows of 512 tokens from the wiki-v1
calibration split, seed 0 (the protocol's full setting is 128).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from slimlm.data import calibration_batch, protocol_texts
from slimlm.eval import Result, evaluate
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.quant import RTN
from slimlm.quant.awq_handler import AWQ, apply_awq
from slimlm.quant.rtn import apply_rtn
from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"


def row(name: str, r: Result, base: Result, secs: float) -> str:
    return " | ".join([name, *quality_cells(r, base.quality.perplexity), f"{secs:.1f}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="int4-g64,int3-g64")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rows", type=int, default=4096, help="AWQ n_sample_rows (tokens kept for mean |x|)")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--speed", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = dict(protocol="wiki-v1", n_tokens=args.tokens, speed=args.speed)
    model, tok = load_model(MODEL)
    base = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), model_dir=model_dir(MODEL), **common)
    calib = calibration_batch(tok, protocol_texts("wiki-v1").calibration, n_samples=args.samples, seq_len=512, seed=0)
    del model
    vs_base = dict(base_source=MODEL, base_id=model_id(MODEL), load_base=lambda: load_model(MODEL)[0])
    head = ("method", "ppl", "Δppl", "KLD", "top-1", "bpw", "compress s")
    lines = [" | ".join(head), " | ".join("---" for _ in head), row("base", base, base, 0.0)]
    print("\n".join(lines), flush=True)
    for scheme in args.schemes.split(","):
        for name, cfg, fn in [
            (f"RTN {scheme}", RTN(scheme=scheme), apply_rtn),
            (f"AWQ {scheme}", AWQ(scheme=scheme, clip_search=not args.no_clip, n_sample_rows=args.rows), apply_awq),
        ]:
            model, tok = load_model(MODEL)
            t0 = time.perf_counter()
            fn(model, cfg, calib)
            secs = time.perf_counter() - t0
            r = evaluate(model, tok, source=name, **vs_base, **common)
            lines.append(row(name, r, base, secs))
            print(lines[-1], flush=True)
            del model
    print(f"\nprotocol wiki-v1, {base.quality.tokens:,} eval tokens, calibration {args.samples}x512 seed 0, "
          f"AWQ n_sample_rows {args.rows}, {torch.get_num_threads()} threads\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
