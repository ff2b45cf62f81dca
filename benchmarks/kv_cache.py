"""Long-text perplexity and cache memory per KV-cache policy on the built-in model.

    .venv/bin/python benchmarks/kv_cache.py [--tokens 8192] [--budgets 256,512,1024]
        [--policies full,recompute,window,sinks,h2o,kivi8,kivi4] [--threads 2] [--json out.json]

One stream of the first ``--tokens`` tokens of the wiki-v1 evaluation text,
every token scored with the cache the policy leaves (slimlm.eval.longtext):
evicting policies prefill ``budget`` tokens and then step one token at a time
(about ``tokens - budget`` forwards each: the slow rows), the full and KIVI
caches run in exact chunks. ``ppl t>=B`` is the perplexity of the tokens past
the largest budget, the same tokens for every row, where eviction has
happened for every budget. ``recompute`` is the paper's sliding window with
re-computation (each token from the last ``budget - stride`` .. ``budget``
tokens encoded afresh): what a ``budget``-token context can give at best.
Memory is what the cache holds at the end of the stream. SmolLM2-135M's
max_position_embeddings is 8192: the full cache past that is out of its
trained range, the evicting caches never are.

Cost: the evicting rows take ``tokens - budget`` forwards each; at 8,192
tokens and 3 budgets that is ~9 x 7,500 steps (roughly 30-60 minutes on 2
quiet cores); the full, KIVI and recompute rows take seconds to minutes.

Smoke: ``--tokens 1024 --budgets 256 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from slimlm.eval.longtext import LongTextScore, score_recompute, score_stream, stream_tokens
from slimlm.generation.decoder import make_decoder
from slimlm.generation.kv import H2O, KIVI, Sinks, Window
from slimlm.models import load_model

MODEL = "smollm2-135m"
POLICIES = ("full", "recompute", "window", "sinks", "h2o", "kivi8", "kivi4", "kivi2")


def kinds(policies: list[str], budgets: list[int], args) -> list[tuple[str, int | None, object]]:
    """(policy, budget, cache kind) rows; budget-free rows (full, kivi) once; "recompute" is not a cache."""
    rows = []
    for name in policies:
        if name == "full":
            rows.append((name, None, None))
        elif name.startswith("kivi"):
            rows.append((name, None, KIVI(int(name[4:]), group=args.kivi_group, residual=args.kivi_residual)))
        else:
            for b in budgets:
                make = {"window": Window, "sinks": lambda b: Sinks(b, args.sinks), "h2o": H2O, "recompute": str}
                rows.append((name, b, "recompute" if name == "recompute" else make[name](b)))
    return rows


def table(rows: list[tuple[str, int | None, LongTextScore]], start: int) -> str:
    full = next((s for n, _, s in rows if n == "full"), None)
    head = ("policy", "budget", "ppl", "Δppl vs full", f"ppl t>={start}", "cache MB", "vs full", "s", "ms/token")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, budget, s in rows:
        lines.append(" | ".join([
            s.name, str(budget or "-"), f"{s.perplexity:.2f}",
            f"{s.perplexity / full.perplexity - 1:+.1%}" if full else "-", f"{s.perplexity_from(start):.2f}",
            f"{s.cache_bytes / 1e6:.1f}", f"{s.cache_bytes / full.cache_bytes:.3f}" if full else "-",
            f"{s.seconds:.0f}", f"{1000 * s.seconds / s.tokens:.1f}",
        ]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--budgets", default="256,512,1024")
    p.add_argument("--policies", default="full,recompute,window,sinks,h2o,kivi8,kivi4",
                   help=f"any of {','.join(POLICIES)}")
    p.add_argument("--stride", type=int, default=None, help="recompute: targets per re-encoded window "
                                                            "(default budget // 8)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--kivi-group", type=int, default=32)
    p.add_argument("--kivi-residual", type=int, default=128)
    p.add_argument("--chunk", type=int, default=512, help="tokens per forward for the full and KIVI caches")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        p.error(f"unknown policies {unknown}; choose from {','.join(POLICIES)}")
    budgets = [int(b) for b in args.budgets.split(",")]
    model, tok = load_model(MODEL)
    decoder = make_decoder(model)
    ids = stream_tokens(tok, args.tokens)
    rows = []
    for name, budget, kind in kinds(policies, budgets, args):
        if kind == "recompute":
            score = score_recompute(decoder, ids, budget, stride=args.stride or max(1, budget // 8))
        else:
            score = score_stream(decoder, ids, kind, chunk=args.chunk)
        rows.append((name, budget, score))
        print(table(rows, max(budgets)).splitlines()[-1], flush=True)
    print(f"\nwiki-v1 evaluation text, one stream of {args.tokens:,} tokens, {MODEL}, "
          f"{torch.get_num_threads()} threads\n")
    print(table(rows, max(budgets)))
    if args.json:
        doc = [dict(policy=n, budget=b, name=s.name, tokens=s.tokens, perplexity=s.perplexity,
                    perplexity_past_budget=s.perplexity_from(max(budgets)), cache_bytes=s.cache_bytes,
                    seconds=s.seconds) for n, b, s in rows]  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
