"""Parameter-efficient fine-tuning on the built-in model: the adaptation table and the recovery rows.

    .venv/bin/python benchmarks/peft_bench.py [--rows full,lora4,lora16,qlora,...,lora@gptq3,lora@sparse24] \
        [--steps 200] [--threads 2] [--model smollm2-135m] \
        [--samples 256] [--tokens 16384] [--forget wiki-v1] [--out out/peft-bench.json] [--table]

Adaptation rows fine-tune on the calibration split of ``pydoc-v1`` (Python's help topics; never its
evaluation text) with next-token CE, every row the same ``--steps`` x ``--batch-size`` x ``--seq-len``:
``full`` (every float parameter), ``lora<r>`` (alpha = 2r), ``qlora`` (r 16 on an NF4 base), ``dora``
(r 16), ``adapters`` (Houlsby, width 16), ``prompt`` (16 soft tokens), ``bitfit`` (norms + zero biases
on the block linears), ``bitfit-norms`` (norm weights only: LLaMA has no biases), ``ia3``.
Columns: trainable parameters, training minutes (wall, at --threads), the process's peak RSS
(monotone within one invocation: run rows in separate invocations for per-row peaks), pydoc
perplexity before/after and ``--forget`` perplexity after (forgetting).

Recovery rows ``<lora|qlora>@<gptq3|sparse24>``: the model compressed by GPTQ int3-g64 or 2:4
SparseGPT (calibrated on the wiki-v1 calibration split), then LoRA r 16 with ``loss: kl`` to the
uncompressed model on that split; columns: KLD to the base on the wiki-v1 evaluation windows before
and after, and the KLD closed per million trainable parameters. (qlora@... is lora@... here: the base
is already quantized, so QLoRA keeps its codes.)

Perplexity here is exp(mean next-token NLL) over the protocol's locked windows (``eval_windows``,
BOS-first when the tokenizer adds BOS), the windows ``slimlm eval`` scores. Rows are stored in
``--out`` as they finish; a row already there is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from slimlm.api import apply
from slimlm.distill import frozen_copy
from slimlm.eval import calibration_ids, eval_tokens, for_tokenizer
from slimlm.eval.quality import mean_nll
from slimlm.eval.runner import eval_windows
from slimlm.fsutil import atomic_write_text
from slimlm.models import load_model
from slimlm.peft import IA3, Adapters, BitFit, DoRA, LoRA, PromptTuning, QLoRA
from slimlm.peft.merge import mean_kld
from slimlm.prune.handlers import SparseGPT
from slimlm.quant.gptq_handler import GPTQ
from slimlm.train import TrainConfig, TrainRun, next_token_objective, train

ADAPT = {"full": None, "qlora": lambda t: QLoRA(r=16, alpha=32, **t), "dora": lambda t: DoRA(r=16, alpha=32, **t),
         "adapters": lambda t: Adapters(size=16, **t), "prompt": lambda t: PromptTuning(n_tokens=16, **t),
         "bitfit": lambda t: BitFit(zero_biases=True, **t), "bitfit-norms": lambda t: BitFit(**t),
         "ia3": lambda t: IA3(**t)}  # fmt: skip
BASES = {"gptq3": lambda: GPTQ(scheme="int3-g64"), "sparse24": lambda: SparseGPT(pattern="2:4")}
RECOVER = ("lora", "qlora")


def parse_rows(text: str) -> list[tuple[str, int | None, str | None]]:
    """``lora16`` -> ("lora", 16, None); ``qlora@gptq3`` -> ("qlora", None, "gptq3"); ``full`` -> (full, None, None)."""
    rows = []
    for row in filter(None, (r.strip() for r in text.split(","))):
        name, _, base = row.partition("@")
        rank = name[4:] if name.startswith("lora") else ""
        if base:
            ok = name in RECOVER and base in BASES
        else:
            ok = name in ADAPT or (name.startswith("lora") and rank.isdigit() and int(rank) > 0)
        if not ok:
            raise SystemExit(f"bad row {row!r}: use {', '.join(ADAPT)}, lora<rank>, or <lora|qlora>@<gptq3|sparse24>")
        rows.append(("lora" if rank else name, int(rank) if rank else None, base or None))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="full,lora4,lora16,lora64,qlora,dora,adapters,prompt,bitfit,bitfit-norms,"
                                     "ia3,lora@gptq3,lora@sparse24")  # fmt: skip
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="learning rate for every row (default: each method's)")
    p.add_argument("--samples", type=int, default=256, help="training sequences of the calibration split")
    p.add_argument("--calib-samples", type=int, default=32, help="GPTQ / SparseGPT calibration sequences")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens per text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--forget", default="wiki-v1", help="protocol whose perplexity after training shows forgetting")
    p.add_argument("--out", default="out/peft-bench.json")
    p.add_argument("--table", action="store_true", help="print the table from --out and exit")
    args = p.parse_args(argv)
    args.parsed = parse_rows(args.rows)
    if args.steps <= 0 or args.threads <= 0 or args.samples <= 0:
        raise SystemExit("--steps, --threads and --samples must be > 0")
    return args


def windows(tok, protocol: str, n_tokens: int) -> torch.Tensor:
    proto = for_tokenizer(protocol, tok)
    return eval_windows(eval_tokens(tok, proto), proto, n_tokens=n_tokens, full=False)  # (W, window)


def ppl(model, ids: torch.Tensor) -> float:
    return math.exp(mean_nll(model, ids, batch_size=4))


@torch.no_grad()
def kld(base, model, ids: torch.Tensor) -> float:
    """Mean per-token KL(base || model) over the windows, 4 at a time."""
    parts = [mean_kld(base(input_ids=b, use_cache=False).logits, model(input_ids=b, use_cache=False).logits)
             for b in ids.split(4)]  # fmt: skip
    return sum(parts) / len(parts)


def train_fields(args) -> dict:
    lr = {} if args.lr is None else {"lr": args.lr}
    return dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, samples=args.samples,
                precision="fp32", **lr)  # fmt: skip


def adapt_row(name: str, rank: int | None, args, store: dict) -> dict:
    model, tok = load_model(args.model)
    train_ids = calibration_ids(tok, "pydoc-v1", n_samples=args.samples)
    pydoc = windows(tok, "pydoc-v1", args.tokens)
    before = store.setdefault("pydoc_ppl_base", ppl(model, pydoc))
    fields, t0 = train_fields(args), time.perf_counter()
    if name == "full":
        fields.pop("samples")
        config = TrainConfig(**{"lr": 1e-5, **fields})
        params = [p for p in model.parameters() if p.is_floating_point()]
        train(model, params, next_token_objective, train_ids, config, desc="full fine-tuning")
        trainable = sum(p.numel() for p in params)
        config_text = repr(config)
    else:
        config = LoRA(r=rank, alpha=2 * rank, **fields) if name == "lora" else ADAPT[name](fields)
        run = TrainRun()
        apply(model, config, train_ids, run=run)
        trainable, config_text = run.reports[0]["trainable_params"], repr(config)
    minutes = (time.perf_counter() - t0) / 60
    return dict(trainable=trainable, minutes=minutes, pydoc_before=before, pydoc_after=ppl(model, pydoc),
                forget_after=ppl(model, windows(tok, args.forget, args.tokens)), config=config_text)


def recover_row(name: str, base_name: str, args, store: dict) -> dict:
    model, tok = load_model(args.model)
    teacher = frozen_copy(model)
    apply(model, BASES[base_name](), calibration_ids(tok, "wiki-v1", n_samples=args.calib_samples))
    wiki = windows(tok, "wiki-v1", args.tokens)
    before = kld(teacher, model, wiki)
    config = (QLoRA if name == "qlora" else LoRA)(r=16, alpha=32, loss="kl", **train_fields(args))
    t0 = time.perf_counter()
    run = TrainRun(teacher=teacher)
    apply(model, config, calibration_ids(tok, "wiki-v1", n_samples=args.samples), run=run)
    after, trainable = kld(teacher, model, wiki), run.reports[0]["trainable_params"]
    return dict(trainable=trainable, minutes=(time.perf_counter() - t0) / 60, kld_before=before, kld_after=after,
                kld_closed_per_m=(before - after) / trainable * 1e6, config=repr(config))  # fmt: skip


def table(store: dict) -> str:
    head = "row | trainable | minutes | peak RSS MB | pydoc ppl before | after | forget ppl after | KLD before | " \
           "KLD after | KLD closed / M params"  # fmt: skip
    lines = [head, " | ".join("---" for _ in head.split(" | "))]
    for row, r in store.get("rows", {}).items():
        cells = [row, f"{r['trainable']:,}", f"{r['minutes']:.1f} ({r['threads']}t)", f"{r['peak_rss_mb']:.0f}"]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in ("pydoc_before", "pydoc_after", "forget_after",
                                                             "kld_before", "kld_after", "kld_closed_per_m")]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    store = json.loads(out.read_text()) if out.is_file() else {"model": args.model}
    if args.table:
        print(table(store))
        return
    torch.set_num_threads(args.threads)
    rows = store.setdefault("rows", {})
    for (name, rank, base), text in zip(args.parsed, filter(None, (r.strip() for r in args.rows.split(",")))):
        if text in rows:
            continue
        result = recover_row(name, base, args, store) if base else adapt_row(name, rank, args, store)
        rows[text] = dict(result, steps=args.steps, threads=torch.get_num_threads(),
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(store, indent=1) + "\n")
    print(table(store))


if __name__ == "__main__":
    main()
