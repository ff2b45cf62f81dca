"""Structured pruning (width: heads + neurons; depth: layers) on the built-in model, protocol wiki-v1, one run.

    .venv/bin/python benchmarks/structured.py [--params 0.1,0.25,0.4] [--modes width,depth]
        [--tokens 16384] [--calib-samples 128] [--prompt-tokens 512] [--new-tokens 128] [--runs 3]
        [--threads 2] [--no-speed] [--json out.json]

Rows: dense, then per mode and fraction of the model's total parameters a
``Structured(params=..., mode=...)`` model, saved with save_compressed,
reloaded with load_compressed and measured (the checkpoint a user gets).
Modes: ``width`` (attention in whole KV groups or query heads per group,
MLP neurons for the rest, the split chosen by calibration loss), fixed
splits ``width-groups`` (whole KV groups, nearest step), ``width-heads`` (query
heads per group, nearest step), ``width-mlp`` (neurons only); ``depth``
(ShortGPT block importance), ``depth-ppl`` (calibration perplexity per dropped
layer). No recovery
training: the accuracy cost is shown as it is.

Speed is prefill and greedy decode tokens/s at batch 1 as a ratio to the
dense model measured in the same process. With ``--rounds N`` every model is
timed N times, interleaved (dense, pruned..., dense, pruned...), and the best
round counts: other processes only ever slow a run down, so the best of
interleaved rounds is the least noisy ratio. The dense model's tokens/s per
round are printed to show the noise. Shared machines are noisy: re-run the
final table on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from slimlm.api import apply
from slimlm.eval import Result, calibration_ids, evaluate, get_protocol, measure_speed
from slimlm.eval.runner import eval_tokens
from slimlm.io import save_compressed, load_compressed
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.prune.structured_config import Structured
from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"
MODES = {
    "width": dict(mode="width"),
    "width-groups": dict(mode="width", attention="groups"),
    "width-heads": dict(mode="width", attention="heads"),
    "width-mlp": dict(mode="width", attention="none"),
    "depth": dict(mode="depth"),
    "depth-ppl": dict(mode="depth", metric="perplexity"),
}


def speed(model, prompt: torch.Tensor, args) -> tuple[float, float]:
    s = measure_speed(model, prompt, new_tokens=args.new_tokens, runs=args.runs)
    return s.prefill_tokens_per_s, s.decode_tokens_per_s


def time_interleaved(rows: list[dict], prompt: torch.Tensor, args) -> list[tuple[float, float]]:
    """Each row's best (prefill, decode) tokens/s over ``args.rounds`` interleaved rounds; -> dense per round."""
    dense = []
    for _ in range(0 if args.no_speed else args.rounds):
        for r in rows:
            sp = speed(r["model"], prompt, args)
            r["speed"] = sp if r["speed"] is None else (max(r["speed"][0], sp[0]), max(r["speed"][1], sp[1]))
            if r is rows[0]:
                dense.append(sp)
    return dense


def prune_one(mode: str, params: float, calib: torch.Tensor, tmp: Path, args) -> dict:
    model, tok = load_model(MODEL)
    config = Structured(params=params, **MODES[mode])
    t0 = time.perf_counter()
    apply(model, config, calib)
    seconds = time.perf_counter() - t0
    cfg = model.config
    shape = f"L{cfg.num_hidden_layers} H{cfg.num_attention_heads}/{cfg.num_key_value_heads} I{cfg.intermediate_size}"
    out = save_compressed(model, tok, tmp / f"{mode}-{params}", base_model=MODEL, overwrite=True)
    del model
    model, tok = load_compressed(out)
    result = evaluate(model, tok, source=f"{mode} {params:.0%}", model_id=None, base_source=MODEL,
                      base_id=model_id(MODEL), load_base=lambda: load_model(MODEL)[0], model_dir=str(out),
                      protocol="wiki-v1", n_tokens=args.tokens, speed=False)  # fmt: skip
    return dict(name=f"{mode} {params:.0%}", result=result, seconds=seconds, shape=shape, model=model, speed=None)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(base: dict, rows: list[dict]) -> str:
    head = ("model", "shape", "ppl", "Δppl", "KLD", "top-1", "params M", "removed", "ckpt MB", "prefill", "decode",
            "prune s")  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    b = base["result"]
    for r in [base, *rows]:
        res, sp, bsp = r["result"], r["speed"], base["speed"]
        lines.append(" | ".join([
            r["name"], r["shape"], *quality_cells(res, b.quality.perplexity)[:4], f"{res.size.params / 1e6:.1f}",
            f"{1 - res.size.params / b.size.params:.1%}", f"{(res.size.checkpoint_bytes or 0) / 1e6:.0f}",
            _ratio(sp and sp[0], bsp and bsp[0]), _ratio(sp and sp[1], bsp and bsp[1]), f"{r['seconds']:.0f}",
        ]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="0.1,0.25,0.4", help="fractions of the total parameters to remove")
    p.add_argument("--modes", default="width,depth", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's 16,384)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: protocol's 128)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="speed prompt (default: protocol's 512)")
    p.add_argument("--new-tokens", type=int, default=None, help="speed decode steps (default: protocol's 128)")
    p.add_argument("--runs", type=int, default=None, help="timed speed runs (default: protocol's 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved speed rounds; the best counts (default 1)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    proto = get_protocol("wiki-v1")
    args.new_tokens, args.runs = args.new_tokens or proto.new_tokens, args.runs or proto.speed_runs
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(unknown)}; valid: {', '.join(MODES)}")
    model, tok = load_model(MODEL)
    prompt = eval_tokens(tok, proto)[: args.prompt_tokens or proto.prompt_tokens]
    calib = calibration_ids(tok, "wiki-v1", n_samples=args.calib_samples)
    dense = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), model_dir=model_dir(MODEL),
                     protocol="wiki-v1", n_tokens=args.tokens, speed=False)  # fmt: skip
    base = dict(name="dense", result=dense, seconds=0.0, speed=None, model=model,
                shape=f"L{model.config.num_hidden_layers} H{model.config.num_attention_heads}/"
                      f"{model.config.num_key_value_heads} I{model.config.intermediate_size}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for frac in (float(x) for x in args.params.split(",")):
                rows.append(prune_one(mode, frac, calib, Path(tmp), args))
                print(table(base, rows[-1:]).splitlines()[-1], flush=True)
    dense_rounds = time_interleaved([base, *rows], prompt, args)
    sp, threads = base["speed"], torch.get_num_threads()
    print(f"\nprotocol wiki-v1, {dense.quality.tokens:,} tokens, calibration {calib.shape[0]}x{calib.shape[1]}, "
          f"{threads} threads"
          + (f"; speed: prompt {len(prompt)}, {args.new_tokens} new tokens, median of {args.runs}; dense prefill "
             f"{sp[0]:.0f} tok/s, decode {sp[1]:.1f} tok/s (best of {args.rounds} interleaved rounds; per round: "
             + ", ".join(f"{d:.1f}" for _, d in dense_rounds) + ")" if sp else "") + "\n")  # fmt: skip
    print(table(base, rows))
    if args.json:
        doc = [dict(name=r["name"], shape=r["shape"], prune_seconds=r["seconds"], speed=r["speed"], threads=threads,
                    result=r["result"].to_dict()) for r in [base, *rows]]  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
