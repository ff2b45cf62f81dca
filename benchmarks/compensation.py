"""Low-rank compensation of quantization error (EoRA) on the built-in model: quality per bit per weight.

    .venv/bin/python benchmarks/compensation.py [--rows gptq-int3-g64,gptq-int3-g64+eora32,...]
        [--model smollm2-135m] [--protocol wiki-v1] [--tokens N] [--calib-samples 128] [--threads 2]
        [--no-speed] [--json out.json]

A row is a GPTQ scheme, optionally followed by ``+eora<rank>`` (whitened by
the calibration inputs, the EoRA/SVD-LLM map) or ``+svd<rank>`` (plain SVD of
the residual W - Q(W), no whitening): ``gptq-int3-g64+eora32``. Each GPTQ
scheme is quantized once; its compensated rows are made from copies of it
with the float model as ``original`` (what a recipe step gets). Every row is
measured in-process against the float model on the protocol: perplexity,
KL divergence to the base, top-1 agreement, bits per weight counted from the
stored bytes (codes, scales, zeros and the float16 side path), the side
path's share of them, greedy decode tokens/s, and for compensated rows the
KLD it removes per extra bit per weight (vs the same GPTQ row without it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass

import torch

from slimlm.api import apply
from slimlm.eval import calibration_ids, evaluate, get_protocol, for_tokenizer
from slimlm.eval.runner import eval_tokens
from slimlm.lowrank import EoRA
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.models.size import measure_size
from slimlm.quant.gptq_handler import GPTQ
from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"
ROWS = ("gptq-int3-g64,gptq-int3-g64+eora16,gptq-int3-g64+eora32,gptq-int3-g64+eora64,gptq-int3-g64+svd16,"
        "gptq-int3-g64+svd32,gptq-int3-g64+svd64,gptq-int4-g64")  # fmt: skip
_ROW = re.compile(r"gptq-(?P<scheme>[a-z0-9_-]+?)(?:\+(?P<kind>eora|svd)(?P<rank>[0-9]+))?")


@dataclass(frozen=True)
class Row:
    name: str
    scheme: str  # the GPTQ scheme, e.g. "int3-g64"
    rank: int | None = None  # None: no side path
    whiten: bool = True

    @property
    def base_row(self) -> str:
        return f"gptq-{self.scheme}"


def parse_rows(text: str) -> list[Row]:
    """``"gptq-int3-g64,gptq-int3-g64+eora32,gptq-int3-g64+svd32"`` -> rows; refuses anything else in one line."""
    rows = []
    for name in (s.strip() for s in text.split(",")):
        m = _ROW.fullmatch(name)
        if m is None or (m["rank"] is not None and int(m["rank"]) < 1):
            raise SystemExit(f"bad row {name!r}: write gptq-<scheme>[+eora<rank>|+svd<rank>], "
                             f"e.g. gptq-int3-g64+eora32")  # fmt: skip
        rank = None if m["rank"] is None else int(m["rank"])
        rows.append(Row(name, m["scheme"], rank, m["kind"] != "svd"))
    if len({r.name for r in rows}) < len(rows):
        raise SystemExit("a row is listed twice in --rows")
    return rows


def side_bpw(model) -> float:
    """Bits per weight the side paths add: their bytes over the block linears' weights."""
    side = sum(m.side_storage()[1] for m in model.modules() if hasattr(m, "side_storage"))
    return 8.0 * side / measure_size(model).linear_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=ROWS, help="comma list of gptq-<scheme>[+eora<rank>|+svd<rank>]")
    p.add_argument("--model", default=MODEL, help="built-in name or model directory (the base)")
    p.add_argument("--protocol", default="wiki-v1")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (GPTQ and EoRA)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="skip the decode timing")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.parsed_rows = parse_rows(args.rows)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    base, tok = load_model(args.model)
    proto = for_tokenizer(get_protocol(args.protocol), tok)
    calib = calibration_ids(tok, proto, n_samples=args.calib_samples)  # (N, L)
    common = dict(protocol=proto, n_tokens=args.tokens, speed=not args.no_speed, stream=eval_tokens(tok, proto))
    vs_base = dict(base_source=args.model, base_id=model_id(args.model), load_base=lambda: base)
    results = [dict(row="base", result=evaluate(base, tok, source=args.model, model_id=model_id(args.model),
                                                model_dir=model_dir(args.model), **common), side_bpw=0.0, seconds=0.0)]
    quantized: dict[str, tuple[torch.nn.Module, float]] = {}
    for row in args.parsed_rows:
        if row.base_row not in quantized:
            t0 = time.perf_counter()
            model = apply(copy.deepcopy(base), GPTQ(scheme=row.scheme), calib)
            quantized[row.base_row] = model, time.perf_counter() - t0
        model, seconds = quantized[row.base_row]
        if row.rank is not None:
            t0 = time.perf_counter()
            model = apply(copy.deepcopy(model), EoRA(rank=row.rank, whiten=row.whiten), calib, original=base)
            seconds += time.perf_counter() - t0
        r = evaluate(model, tok, source=row.name, **vs_base, **common)
        results.append(dict(row=row.name, result=r, side_bpw=side_bpw(model), seconds=seconds))
        print(format_row(results[-1], results), flush=True)
    return results


def format_row(entry: dict, results: list[dict]) -> str:
    r, base = entry["result"], results[0]["result"]
    q = r.quality
    gain = "-"
    plain = next((e for e in results if e["row"] == entry["row"].split("+")[0]), None)
    if "+" in entry["row"] and plain is not None and entry["side_bpw"] > 0:
        gain = f"{(plain['result'].quality.kld - q.kld) / entry['side_bpw']:.4f}"
    decode = f"{r.speed.decode_tokens_per_s:.1f}" if r.speed else "-"
    return " | ".join([entry["row"], *quality_cells(r, base.quality.perplexity), f"{entry['side_bpw']:.2f}", gain,
                       decode, f"{entry['seconds']:.1f}"])  # fmt: skip


HEAD = ("row", "ppl", "Δppl", "KLD", "top-1", "bpw", "side bpw", "ΔKLD/side bit", "decode tok/s", "compress s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run(args)
    lines = [" | ".join(HEAD), " | ".join("---" for _ in HEAD), *(format_row(e, results) for e in results)]
    print(f"\n{args.model}, protocol {args.protocol}, {results[0]['result'].quality.tokens:,} eval tokens, "
          f"calibration {args.calib_samples} sequences, {args.threads} threads; bpw counts the stored bytes, "
          f"side path (float16) included\n")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        rows = [dict(row=e["row"], quality=dataclasses.asdict(e["result"].quality), bpw=e["result"].size.bits_per_weight,
                     side_bpw=e["side_bpw"], seconds=e["seconds"],
                     decode_tok_s=e["result"].speed and e["result"].speed.decode_tokens_per_s) for e in results]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
