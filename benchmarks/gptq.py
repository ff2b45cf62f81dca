"""GPTQ vs RTN on the built-in model, protocol wiki-v1, one run.

    .venv/bin/python benchmarks/gptq.py [--schemes int4-g64,int3-g64] [--samples 32] [--seq-len 512]
                                        [--tokens 8192] [--threads 1] [--percdamp 0.01]

Rows: base, then per scheme RTN, GPTQ without act-order (static groups, and
dynamic groups as in the reference code's default), GPTQ with act-order
(static groups, the config default). Compressed models are measured in memory (no save/reload); KLD and
top-1 agreement are to the base model's cached outputs on the same windows.
``--threads 1`` by default: on a shared 2-core machine torch's thread pool
is slower than one thread for GPTQ's many small column operations.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from slimlm.data import calibration_batch, protocol_texts
from slimlm.eval import Result, evaluate
from slimlm.models import load_model
from slimlm.models.identity import model_id
from slimlm.quant import GPTQ, RTN, apply_gptq, apply_rtn
from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"


def methods(scheme: str, percdamp: float) -> list[tuple[str, object]]:
    return [
        (f"rtn {scheme}", RTN(scheme=scheme)),
        (f"gptq {scheme}", GPTQ(scheme=scheme, act_order=False, percdamp=percdamp)),
        (f"gptq {scheme} dynamic-groups", GPTQ(scheme=scheme, act_order=False, static_groups=False, percdamp=percdamp)),
        (f"gptq {scheme} act-order", GPTQ(scheme=scheme, act_order=True, percdamp=percdamp)),
    ]


def run_one(config: object, calib: torch.Tensor) -> tuple[torch.nn.Module, object, float]:
    model, tok = load_model(MODEL)
    t0 = time.perf_counter()
    if isinstance(config, GPTQ):
        apply_gptq(model, config, calib)
    else:
        apply_rtn(model, config)
    return model, tok, time.perf_counter() - t0


def row(name: str, r: Result, base: Result, seconds: float) -> str:
    return " | ".join([name, *quality_cells(r, base.quality.perplexity), f"{seconds:.0f}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="int4-g64,int3-g64")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--only", default=None, help="comma list of row names to run (e.g. 'gptq int4-g64 act-order')")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    common = dict(protocol="wiki-v1", n_tokens=args.tokens, speed=False)
    model, tok = load_model(MODEL)
    base = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), **common)
    calib = calibration_batch(tok, protocol_texts("wiki-v1").calibration, n_samples=args.samples,
                              seq_len=args.seq_len, seed=0)  # fmt: skip
    del model
    head = ("method", "ppl", "Δppl", "KLD", "top-1", "bpw", "compress s")
    lines = [" | ".join(head), " | ".join("---" for _ in head), row("base", base, base, 0.0)]
    print(lines[-1], flush=True)
    for scheme in args.schemes.split(","):
        for name, config in methods(scheme, args.percdamp):
            if args.only and name not in args.only.split(","):
                continue
            model, tok, seconds = run_one(config, calib)
            r = evaluate(model, tok, source=name, base_source=MODEL, base_id=model_id(MODEL),
                         load_base=lambda: load_model(MODEL)[0], **common)  # fmt: skip
            lines.append(row(name, r, base, seconds))
            print(lines[-1], flush=True)
            del model
    print(f"\nprotocol wiki-v1, {base.quality.tokens:,} eval tokens; calibration {args.samples} x {args.seq_len} "
          f"tokens (seed 0); {args.threads} thread(s); percdamp {args.percdamp}\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
