"""W8A8 methods on the built-in model, protocol wiki-v1, one run.

    .venv/bin/python benchmarks/w8a8.py [--tokens 8192] [--calib-samples 32] [--methods a,b] [--threads 2]
        [--allow-slow]

Rows: the float base, naive W8A8 with one activation scale per tensor and per
token, SmoothQuant (alpha 0.5 and 0.8, with and without smoothing o_proj /
down_proj through v_proj / up_proj) and LLM.int8() (outlier columns fixed
from calibration plus caught at run time, or only at run time). Each method
is applied to a fresh copy of the base, saved with save_compressed, reloaded
and measured: perplexity, KL divergence and top-1 agreement to the base,
bits per weight of the compressed linears.

Prefill: one forward of a batch-1, 512-token prompt (no KV cache), median
of 5 after a warm-up, in this process; the base is timed in float32 and in
bfloat16. Ratios are to those (the machine is shared: compare ratios). A
method whose layers did not all run the int8 x int8 kernel stops the run
(exit 1, naming the layer and the reason); --allow-slow times it anyway.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimlm.eval import Result, calibration_ids, evaluate
from slimlm.io import load_compressed, save_compressed
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.quant.llm_int8 import LLMInt8, apply_llm_int8
from slimlm.quant.w8a8 import W8A8, SmoothQuant, apply_smoothquant, apply_w8a8
from _fast import expect_fast  # benchmarks/ is on sys.path when a script runs
from _table import quality_cells

MODEL = "smollm2-135m"
METHODS = {
    "w8a8-tensor": (W8A8(act_granularity="tensor"), apply_w8a8),
    "w8a8-token": (W8A8(act_granularity="token"), apply_w8a8),
    "smoothquant-0.5": (SmoothQuant(alpha=0.5), apply_smoothquant),
    "llm.int8": (LLMInt8(threshold=6.0), apply_llm_int8),
    "smoothquant-0.8": (SmoothQuant(alpha=0.8), apply_smoothquant),
    "smoothquant-0.5-norms-only": (SmoothQuant(alpha=0.5, fold_previous=False), apply_smoothquant),
    "smoothquant-0.5-tensor": (SmoothQuant(alpha=0.5, act_granularity="tensor"), apply_smoothquant),
    "llm.int8-dynamic": (LLMInt8(threshold=6.0, calibrated=False), apply_llm_int8),
}
DEFAULT = "w8a8-tensor,w8a8-token,smoothquant-0.5,llm.int8,smoothquant-0.8"


@torch.no_grad()
def prefill_tokens_per_s(model: torch.nn.Module, *, length: int = 512, runs: int = 5) -> float:
    ids = torch.randint(100, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    model(ids, use_cache=False)  # warm-up (and kernels' first-use checks)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return length / statistics.median(times)


def measure(name: str, calib: torch.Tensor, *, tmp: Path, common: dict,
            allow_slow: bool = False) -> tuple[Result, float, float]:
    config, handler = METHODS[name]
    model, tok = load_model(MODEL)
    t0 = time.perf_counter()
    handler(model, config, calib)
    seconds = time.perf_counter() - t0
    out = save_compressed(model, tok, tmp / name, base_model=MODEL, recipe=repr(config))
    del model
    model, tok = load_compressed(out)
    result = evaluate(model, tok, source=name, model_id=None, base_source=MODEL, base_id=model_id(MODEL),
                      load_base=lambda: load_model(MODEL)[0], model_dir=str(out), **common)  # fmt: skip
    tps = prefill_tokens_per_s(model)  # its warm-up runs the kernels' first-use checks
    expect_fast(model, name, allow_slow=allow_slow)
    return result, seconds, tps


def row(name: str, r: Result, base: Result, secs: float, tps: float, fp32: float, bf16: float) -> str:
    return " | ".join([name, *quality_cells(r, base.quality.perplexity), f"{tps:.0f}", f"{tps / fp32:.2f}x",
                       f"{tps / bf16:.2f}x", f"{secs:.1f}"])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=DEFAULT, help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: protocol's 16384)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: protocol's 128)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allow-slow", action="store_true",
                   help="time a method even when a layer fell back to the reference path (default: exit 1)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(protocol="wiki-v1", n_tokens=args.tokens, speed=False)
    model, tok = load_model(MODEL)
    base = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), model_dir=model_dir(MODEL), **common)
    fp32 = prefill_tokens_per_s(model)
    bf16 = prefill_tokens_per_s(model.to(torch.bfloat16))
    del model
    calib = calibration_ids(tok, "wiki-v1", n_samples=args.calib_samples)
    head = ("method", "ppl", "Δppl", "KLD", "top-1", "bpw", "prefill tok/s", "vs fp32", "vs bf16", "compress s")
    lines = [" | ".join(head), " | ".join("---" for _ in head), row("base fp32", base, base, 0.0, fp32, fp32, bf16)]
    print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            r, secs, tps = measure(name, calib, tmp=Path(tmp), common=common, allow_slow=args.allow_slow)
            lines.append(row(name, r, base, secs, tps, fp32, bf16))
            print(lines[-1], flush=True)
    print(f"\nprotocol wiki-v1, {base.quality.tokens:,} eval tokens, {calib.shape[0]}x{calib.shape[1]} calibration "
          f"tokens, {torch.get_num_threads()} threads; prefill = batch 1 x 512 tokens, median of 5; "
          f"base bf16 prefill {bf16:.0f} tok/s\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
