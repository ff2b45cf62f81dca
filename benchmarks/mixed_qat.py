"""Mixed-precision allocation and QAT vs RTN on the built-in model, protocol wiki-v1, one run.

    .venv/bin/python benchmarks/mixed_qat.py [--budgets 3.5,4.25] [--samples 32] [--seq-len 512] [--tokens 8192]
        [--qat-steps 40] [--qat-lr 3e-4] [--qat-seq-len 256] [--qat-batch 4] [--qat-loss kl|ce] [--only ...]
        [--base-ppl PPL]

Rows: base; RTN ternary and QAT ternary (a short run: steps x batch x
seq_len tokens, stated below the table); RTN int3-g64 and int4-g64;
MixedPrecision at each budget over {int2-g64, int3-g64, int4-g64,
int8-channel-sym}. ``--base-ppl`` skips re-scoring the base when its
perplexity on the same windows is known (KLD uses its cached outputs).
Compressed models are measured in memory; KLD and top-1 agreement
are to the base model's cached outputs on the same windows. The mixed
allocation (bits per layer type and depth) is logged for each budget.
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
from slimlm.quant import RTN, apply_rtn
from slimlm.quant.mixed_handler import MixedPrecision, apply_mixed
from slimlm.quant.qat import QAT, apply_qat
from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"


def methods(args) -> list[tuple[str, object]]:
    qat = QAT(scheme="ternary", steps=args.qat_steps, lr=args.qat_lr, seq_len=args.qat_seq_len,
              batch_size=args.qat_batch, distill=args.qat_loss == "kl",
              warmup=max(1, args.qat_steps // 10))  # fmt: skip
    return [
        ("rtn ternary", RTN(scheme="ternary")),
        (f"qat ternary ({args.qat_loss})", qat),
        ("rtn int3-g64", RTN(scheme="int3-g64")),
        ("rtn int4-g64", RTN(scheme="int4-g64")),
        *[(f"mixed {b} bpw", MixedPrecision(budget_bpw=float(b))) for b in args.budgets.split(",") if b],
        *[(f"mixed {b} bpw raw", MixedPrecision(budget_bpw=float(b), normalize=False))
          for b in args.raw_budgets.split(",") if b],
    ]  # fmt: skip


def run_one(config: object, calib: torch.Tensor) -> tuple[torch.nn.Module, object, float]:
    model, tok = load_model(MODEL)
    t0 = time.perf_counter()
    with torch.no_grad():  # as slimlm.api.apply runs handlers
        if isinstance(config, MixedPrecision):
            apply_mixed(model, config, calib)
        elif isinstance(config, QAT):
            apply_qat(model, config, calib)
        else:
            apply_rtn(model, config)
    return model, tok, time.perf_counter() - t0


def row(name: str, r: Result | None, base_ppl: float, seconds: float) -> str:
    if r is None:  # the base itself
        return " | ".join([name, f"{base_ppl:.2f}", "+0.0%", "0.0000", "100.0%", "32.000", "0"])
    return " | ".join([name, *quality_cells(r, base_ppl, bpw_digits=3), f"{seconds:.0f}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="3.5,4.25")
    p.add_argument("--raw-budgets", default="", help="budgets to also run with normalize=False (raw errors)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--qat-steps", type=int, default=40)
    p.add_argument("--qat-lr", type=float, default=3e-4)
    p.add_argument("--qat-seq-len", type=int, default=256)
    p.add_argument("--qat-batch", type=int, default=4)
    p.add_argument("--qat-loss", choices=("kl", "ce"), default="kl")
    p.add_argument("--base-ppl", type=float, default=None,
                   help="skip scoring the base (KLD still uses its cached outputs) and use this perplexity")
    p.add_argument("--only", default=None, help="comma list of row-name substrings to run (e.g. 'mixed,qat')")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("slimlm.quant").setLevel(logging.INFO)
    common = dict(protocol="wiki-v1", n_tokens=args.tokens, speed=False)
    model, tok = load_model(MODEL)
    base_ppl = args.base_ppl
    if base_ppl is None:
        base_ppl = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), **common).quality.perplexity
    calib = calibration_batch(tok, protocol_texts("wiki-v1").calibration, n_samples=args.samples,
                              seq_len=args.seq_len, seed=0)  # fmt: skip
    del model
    head = ("method", "ppl", "Δppl", "KLD", "top-1", "bpw", "compress s")
    lines = [" | ".join(head), " | ".join("---" for _ in head), row("base", None, base_ppl, 0.0)]
    print(lines[-1], flush=True)
    for name, config in methods(args):
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        model, tok, seconds = run_one(config, calib)
        r = evaluate(model, tok, source=name, base_source=MODEL, base_id=model_id(MODEL),
                     load_base=lambda: load_model(MODEL)[0], **common)  # fmt: skip
        lines.append(row(name, r, base_ppl, seconds))
        print(lines[-1], flush=True)
        del model
    qat_tokens = args.qat_steps * args.qat_batch * args.qat_seq_len
    print(f"\nprotocol wiki-v1, {args.tokens:,} eval tokens; calibration {args.samples} x {args.seq_len} "
          f"tokens (seed 0); {torch.get_num_threads()} thread(s); QAT: {args.qat_steps} steps x {args.qat_batch} x "
          f"{args.qat_seq_len} = {qat_tokens:,} tokens, lr {args.qat_lr}, cosine, loss {args.qat_loss}\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
