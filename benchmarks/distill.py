"""Recovery by distillation on the built-in model (Minitron: prune, then distil), protocol wiki-v1.

    .venv/bin/python benchmarks/distill.py --rows width-25:kl,width-25:ce,depth-25:kl \
        [--steps 100] [--batch-size 4] [--seq-len 256] [--lr 3e-4] [--samples 512] \
        [--calib-samples 32] [--tokens 16384] [--threads 2] [--work out/distill-bench] [--speed] [--table]

A row is ``<mode>-<percent>:<objective>[@steps]``: ``Structured(params=percent/100, mode=mode)`` applied to
the built-in model (importance from ``--calib-samples`` calibration sequences, default 32), then
``Distill(loss=..., steps, ...)`` from the unpruned model on ``--samples`` sequences of the
calibration split (never the evaluation text). Objectives: ``kl`` (forward KL, logit KD), ``ce``
(plain next-token fine-tuning, the same token budget), ``rkl`` (reverse KL), ``kl+hidden`` (logit
KD plus hidden-state MSE over the layer map of the blocks the pruning kept).

Each row runs once and is kept in ``--work/rows.json`` (a row already there is skipped), and each
pruned model is saved once in ``--work`` and reused, so rows can run in separate invocations, one
at a time, on a quiet machine. ``--speed`` measures decode tokens/s of each saved pruned shape
against the dense model (interleaved, best of ``--rounds``) and stores the ratios; ``--table``
prints the table from what is stored. Columns: perplexity and KLD before and after recovery, the
share of the log-perplexity gap to the base that recovery closed (the issue's target is >= 50%:
log(ppl_kd / ppl_base) <= 0.5 log(ppl_pruned / ppl_base)), parameters, the decode speed ratio,
training tokens, training minutes (wall, at the thread count shown) and the process's peak RSS.
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
from slimlm.distill import Distill, frozen_copy
from slimlm.eval import calibration_ids, evaluate, get_protocol, measure_speed
from slimlm.eval.runner import eval_tokens
from slimlm.fsutil import atomic_write_text
from slimlm.io import load_compressed, save_compressed
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.prune.structured_config import Structured

MODEL = "smollm2-135m"
OBJECTIVES = {"kl": dict(loss="kl"), "ce": dict(loss="ce"), "rkl": dict(loss="reverse_kl"),
              "kl+hidden": dict(loss="kl", hidden_weight=1.0)}  # fmt: skip


def parse_row(row: str) -> tuple[str, float, str, int | None]:
    """``width-25:kl`` or ``width-25:kl@240`` (steps for this row instead of --steps)."""
    shape, _, rest = row.partition(":")
    objective, _, steps = rest.partition("@")
    mode, _, pct = shape.partition("-")
    if mode not in ("width", "depth") or not pct.isdigit() or objective not in OBJECTIVES or (steps and not steps.isdigit()):
        raise SystemExit(f"bad row {row!r}: use <width|depth>-<percent>:<{'|'.join(OBJECTIVES)}>[@steps]")
    return mode, int(pct) / 100, objective, int(steps) if steps else None


def quality(model, tok, args, name: str) -> dict:
    r = evaluate(model, tok, source=name, model_id=None, base_source=MODEL, base_id=model_id(MODEL),
                 load_base=lambda: load_model(MODEL)[0], protocol="wiki-v1", n_tokens=args.tokens,
                 speed=False)  # fmt: skip
    return dict(ppl=r.quality.perplexity, kld=r.quality.kld, top1=r.quality.top1_agreement, params=r.size.params)


def pruned(mode: str, params: float, args, store: dict) -> Path:
    """The pruned checkpoint of (mode, params), made once; its quality stored under its key."""
    key = f"{mode}-{round(params * 100)}"
    path = Path(args.work) / key
    if key not in store.setdefault("pruned", {}) or not path.is_dir():
        model, tok = load_model(MODEL)
        t0 = time.perf_counter()
        calib = calibration_ids(tok, "wiki-v1", n_samples=args.calib_samples)
        apply(model, Structured(params=params, mode=mode), calib)
        seconds = time.perf_counter() - t0
        save_compressed(model, tok, path, base_model=MODEL, overwrite=True)
        store["pruned"][key] = dict(prune_seconds=seconds, layers=model.config.num_hidden_layers,
                                    **quality(model, tok, args, key))  # fmt: skip
        save(args, store)
    return path


def run_row(row: str, args, store: dict) -> None:
    mode, params, objective, row_steps = parse_row(row)
    steps = row_steps or args.steps
    path = pruned(mode, params, args, store)
    student, tok = load_compressed(path)
    teacher = frozen_copy(load_model(MODEL)[0])
    train_ids = calibration_ids(tok, "wiki-v1", n_samples=args.samples)
    config = Distill(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     samples=args.samples, **OBJECTIVES[objective])  # fmt: skip
    t0 = time.perf_counter()
    apply(student, config, train_ids, teacher=None if objective == "ce" else teacher)
    minutes = (time.perf_counter() - t0) / 60
    del teacher
    store["rows"][row] = dict(minutes=minutes, tokens=steps * args.batch_size * args.seq_len,
                              threads=torch.get_num_threads(), lr=args.lr, steps=steps,
                              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              **quality(student, tok, args, row))  # fmt: skip
    save(args, store)


def speed(args, store: dict) -> None:
    """Decode tokens/s of each pruned shape over the dense model's, interleaved, best of ``--rounds``."""
    proto = get_protocol("wiki-v1")
    dense, tok = load_model(MODEL)
    prompt = eval_tokens(tok, proto)[: proto.prompt_tokens]
    models = {"dense": dense, **{k: load_compressed(Path(args.work) / k)[0] for k in store["pruned"]}}
    best = {k: 0.0 for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            best[k] = max(best[k], measure_speed(m, prompt, new_tokens=proto.new_tokens, runs=2).decode_tokens_per_s)
    for k in store["pruned"]:
        store["pruned"][k]["decode_ratio"] = best[k] / best["dense"]
    store["dense_decode_tok_s"], store["speed_threads"] = best["dense"], torch.get_num_threads()
    save(args, store)


def table(store: dict) -> str:
    base = store["base"]
    head = ("row", "layers", "params M", "ppl pruned", "ppl after", "KLD pruned", "KLD after", "gap closed",
            "decode", "train tokens", "train min", "peak RSS MB")  # fmt: skip
    lines = [f"base: ppl {base['ppl']:.2f}, {base['params'] / 1e6:.1f}M params", " | ".join(head),
             " | ".join("---" for _ in head)]  # fmt: skip
    for row, r in store["rows"].items():
        p = store["pruned"][row.partition(":")[0]]  # the row's pruned shape
        closed = 1 - math.log(r["ppl"] / base["ppl"]) / math.log(p["ppl"] / base["ppl"])
        ratio = f"{p['decode_ratio']:.2f}x" if "decode_ratio" in p else "-"
        lines.append(" | ".join([row, str(p["layers"]), f"{r['params'] / 1e6:.1f}", f"{p['ppl']:.2f}",
                                 f"{r['ppl']:.2f}", f"{p['kld']:.4f}", f"{r['kld']:.4f}", f"{closed:.0%}", ratio,
                                 f"{r['tokens']:,}", f"{r['minutes']:.1f} ({r['threads']}t)",
                                 f"{r['peak_rss_mb']:.0f}"]))  # fmt: skip
    return "\n".join(lines)


def save(args, store: dict) -> None:
    atomic_write_text(Path(args.work) / "rows.json", json.dumps(store, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="", help="comma list of <width|depth>-<percent>:<kl|ce|rkl|kl+hidden>")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--samples", type=int, default=512, help="training sequences from the calibration split")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences for the pruning importance")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's 16,384)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="out/distill-bench")
    p.add_argument("--speed", action="store_true", help="measure decode speed ratios of the pruned shapes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows_json = Path(args.work) / "rows.json"
    store = json.loads(rows_json.read_text()) if rows_json.is_file() else {"rows": {}, "pruned": {}}
    if "base" not in store:
        model, tok = load_model(MODEL)
        r = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), model_dir=model_dir(MODEL),
                     protocol="wiki-v1", n_tokens=args.tokens, speed=False)  # fmt: skip
        store["base"] = dict(ppl=r.quality.perplexity, params=r.size.params)
        save(args, store)
    for row in [r for r in args.rows.split(",") if r]:
        if row in store["rows"]:
            logging.info("%s: already measured, skipped", row)
            continue
        run_row(row, args, store)
    if args.speed:
        speed(args, store)
    if args.table or args.rows:
        print(table(store))


if __name__ == "__main__":
    main()
