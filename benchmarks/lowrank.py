"""Low-rank factorization on the built-in model: SVD / ASVD / SVD-LLM vs structured pruning at the same size.

    .venv/bin/python benchmarks/lowrank.py --rows svd-20,asvd-20,svd-llm-20,svd-llm-20:spectrum,width-20 \
        [--model smollm2-135m] [--protocol wiki-v1] [--tokens 16384] [--calib-samples 128] [--threads 2] \
        [--rounds 2] [--work out/lowrank-bench] [--table]

A row is ``<method>-<percent>[:<allocation>][:update]``:

* ``svd``, ``asvd``, ``svd-llm``: the slimlm config (``SVD``, ``ASVD``, ``SVDLLM``) with
  ``params=percent/100`` (that share of the decoder linears' weights removed), allocation ``uniform``
  (default) or ``spectrum``; ``:update`` (svd-llm) refits each output factor on the calibration Gram
  (``SVDLLM(update=True)``);
* ``width`` / ``depth``: ``Structured(params=..., mode=...)`` removing the same number of weights
  (``percent/100`` of the decoder linears' weights, converted to a share of all parameters).

Calibrated methods (asvd, svd-llm, width, depth) draw ``--calib-samples`` sequences of the protocol's
calibration split (never the evaluation text). Columns: parameters, perplexity and KLD vs the
uncompressed model on the protocol's windows (``--tokens``), the decode tokens/s ratio vs the dense
model (interleaved, best of ``--rounds``, at ``--threads``) and the minutes the compression took.
Rows are stored in ``--work/rows.json`` as they finish (a stored row is skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from slimlm.api import apply
from slimlm.eval import calibration_ids, evaluate, get_protocol, measure_size, measure_speed
from slimlm.eval.runner import eval_tokens
from slimlm.fsutil import atomic_write_text
from slimlm.lowrank import ASVD, SVD, SVDLLM
from slimlm.models import load_model
from slimlm.models.identity import model_id
from slimlm.prune.structured_config import Structured

LOWRANK = {"svd": SVD, "asvd": ASVD, "svd-llm": SVDLLM}
STRUCTURED = ("width", "depth")
ALLOCATIONS = ("uniform", "spectrum")


def parse_row(row: str) -> tuple[str, float, str, bool]:
    """``svd-llm-20:spectrum:update`` -> ("svd-llm", 0.2, "spectrum", True); allocation defaults to uniform."""
    shape, *opts = row.split(":")
    method, _, pct = shape.rpartition("-")
    allocations = [o for o in opts if o in ALLOCATIONS]
    allocation, update = (allocations or ["uniform"])[0], "update" in opts
    ok = (method in LOWRANK or method in STRUCTURED) and pct.isdigit() and 0 < int(pct) < 100
    ok = ok and len(allocations) + update == len(opts) and (method == "svd-llm" or not update)
    if not ok or (method in STRUCTURED and opts):
        raise SystemExit(f"bad row {row!r}: use <{'|'.join((*LOWRANK, *STRUCTURED))}>-<percent 1..99>"
                         f"[:{'|'.join(ALLOCATIONS)}][:update] (allocation for svd/asvd/svd-llm only, "
                         f"update for svd-llm only)")  # fmt: skip
    return method, int(pct) / 100, allocation, update


def row_config(row: str, *, linear_weights: int, total_params: int):
    """The slimlm config of a row; structured rows remove as many weights as the low-rank rows of that percent."""
    method, params, allocation, update = parse_row(row)
    if method in LOWRANK:
        return LOWRANK[method](params=params, allocation=allocation, **({"update": True} if update else {}))
    return Structured(params=params * linear_weights / total_params, mode=method)


def _quality(model, tok, args, name: str) -> dict:
    r = evaluate(model, tok, source=name, model_id=None, base_source=args.model, base_id=model_id(args.model),
                 load_base=lambda: load_model(args.model)[0], protocol=args.protocol, n_tokens=args.tokens,
                 speed=False)  # fmt: skip
    return dict(ppl=r.quality.perplexity, kld=r.quality.kld, top1=r.quality.top1_agreement, params=r.size.params)


def _decode_ratio(model, args) -> float:
    """Decode tokens/s of ``model`` over the dense model's, interleaved, best of ``--rounds`` each."""
    proto = get_protocol(args.protocol)
    dense, tok = load_model(args.model)
    prompt = eval_tokens(tok, proto)[: proto.prompt_tokens]
    best = {"dense": 0.0, "row": 0.0}
    for _ in range(args.rounds):
        for key, m in (("dense", dense), ("row", model)):
            s = measure_speed(m, prompt, new_tokens=proto.new_tokens, runs=2)
            best[key] = max(best[key], s.decode_tokens_per_s)
    return best["row"] / best["dense"]


def run_row(row: str, args, store: dict) -> None:
    model, tok = load_model(args.model)
    size = measure_size(model)
    config = row_config(row, linear_weights=size.linear_weights, total_params=size.params)
    calib = None
    if not isinstance(config, SVD):
        calib = calibration_ids(tok, args.protocol, n_samples=args.calib_samples)
    t0 = time.perf_counter()
    apply(model, config, calib)
    minutes = (time.perf_counter() - t0) / 60
    store["rows"][row] = dict(minutes=minutes, threads=torch.get_num_threads(), decode_ratio=_decode_ratio(model, args),
                              **_quality(model, tok, args, row))  # fmt: skip
    save(args, store)


def table(store: dict) -> str:
    base = store["base"]
    head = ("row", "params M", "ppl", "KLD", "top-1", "decode vs dense", "minutes")
    lines = [f"base: {store.get('model', '?')}, ppl {base['ppl']:.2f}, {base['params'] / 1e6:.1f}M params",
             " | ".join(head), " | ".join("---" for _ in head)]  # fmt: skip
    for row, r in store["rows"].items():
        lines.append(" | ".join([row, f"{r['params'] / 1e6:.1f}", f"{r['ppl']:.2f}", f"{r['kld']:.4f}",
                                 f"{r['top1']:.3f}", f"{r['decode_ratio']:.2f}x",
                                 f"{r['minutes']:.1f} ({r['threads']}t)"]))  # fmt: skip
    return "\n".join(lines)


def save(args, store: dict) -> None:
    atomic_write_text(Path(args.work) / "rows.json", json.dumps(store, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="", help="comma list of <svd|asvd|svd-llm|width|depth>-<percent>[:spectrum][:update]")
    p.add_argument("--model", default="smollm2-135m", help="model source (a tiny HF directory in tests)")
    p.add_argument("--protocol", default="wiki-v1")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds (best of)")
    p.add_argument("--work", default="out/lowrank-bench")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    for row in rows:
        parse_row(row)  # refuse a typo before minutes of work
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows_json = Path(args.work) / "rows.json"
    store = json.loads(rows_json.read_text()) if rows_json.is_file() else {"rows": {}}
    if store.setdefault("model", args.model) != args.model:
        raise SystemExit(f"{rows_json} holds rows of {store['model']}; use another --work for {args.model}")
    if "base" not in store:
        model, tok = load_model(args.model)
        r = evaluate(model, tok, source=args.model, model_id=model_id(args.model), protocol=args.protocol,
                     n_tokens=args.tokens, speed=False)  # fmt: skip
        store["base"] = dict(ppl=r.quality.perplexity, params=r.size.params)
        save(args, store)
    for row in rows:
        if row in store["rows"]:
            logging.info("%s: already measured, skipped", row)
            continue
        run_row(row, args, store)
    if args.table or rows:
        print(table(store))


if __name__ == "__main__":
    main()
