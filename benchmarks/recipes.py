"""Every shipped recipe on the built-in model, protocol wiki-v1, one run.

    .venv/bin/python benchmarks/recipes.py [--recipes default,rtn-int4-g64] [--tokens 16384] [--no-speed]

Each recipe is applied to a fresh copy of the base model, saved with
save_compressed, reloaded from disk and measured, so the numbers describe the
checkpoint a user would get. "peak MB" is the process's peak resident memory from
loading the model to the end of compression (Linux VmHWM, reset per recipe). Speed ratios are to the base measured in the same
process (these machines are shared and noisy: compare ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from slimlm.api import apply_all, needs_calibration
from slimlm.eval import Result, calibration_ids, evaluate
from slimlm.io import load_compressed, save_compressed
from slimlm.models import load_model
from slimlm.models.identity import model_dir, model_id
from slimlm.recipe import load_recipe, shipped_recipes

MODEL = "smollm2-135m"


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM), so the next reading covers one step."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the reading then covers the whole process
        pass


def _peak_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return kb / 1024 if kb is not None else None


def measure(recipe_name: str, *, tmp: Path, common: dict,
            calib_samples: int | None) -> tuple[Result, float, float | None]:  # fmt: skip
    """(result, compress seconds, peak RSS MB from loading the model to the end of compression)."""
    recipe = load_recipe(recipe_name)
    _reset_peak_rss()
    model, tok = load_model(MODEL)
    steps = list(recipe.steps)
    calib = calibration_ids(tok, "wiki-v1", n_samples=calib_samples) if needs_calibration(steps) else None
    t0 = time.perf_counter()
    apply_all(model, steps, calib)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    out = save_compressed(model, tok, tmp / recipe.name, base_model=MODEL, recipe=recipe.spec)
    del model
    model, tok = load_compressed(out)
    result = evaluate(model, tok, source=recipe.name, model_id=model_id(str(out)), base_source=MODEL,
                      base_id=model_id(MODEL), load_base=lambda: load_model(MODEL)[0], model_dir=str(out),
                      recipe=recipe.spec, **common)  # fmt: skip
    return result, seconds, peak


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(base: Result, rows: list[tuple[Result, float, float | None]]) -> str:
    head = ("recipe", "ppl", "Δppl", "KLD", "top-1", "bpw", "ckpt MB", "prefill", "decode", "compress s",
            "peak MB")  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r, secs, peak in [(base, 0.0, None), *rows]:
        sp, bsp = r.speed, base.speed
        lines.append(" | ".join([
            r.model, f"{r.quality.perplexity:.2f}", f"{r.quality.perplexity / base.quality.perplexity - 1:+.1%}",
            f"{r.quality.kld:.4f}", f"{r.quality.top1_agreement:.1%}", f"{r.size.bits_per_weight:.2f}",
            f"{(r.size.checkpoint_bytes or 0) / 1e6:.0f}",
            _ratio(sp and sp.prefill_tokens_per_s, bsp and bsp.prefill_tokens_per_s),
            _ratio(sp and sp.decode_tokens_per_s, bsp and bsp.decode_tokens_per_s), f"{secs:.1f}",
            f"{peak:.0f}" if peak else "-",
        ]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(sorted(shipped_recipes())))
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: protocol's 128)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    common = dict(protocol="wiki-v1", n_tokens=args.tokens, speed=not args.no_speed)
    model, tok = load_model(MODEL)
    base = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), model_dir=model_dir(MODEL), **common)
    del model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            rows.append(measure(name, tmp=Path(tmp), common=common, calib_samples=args.calib_samples))
            print(table(base, rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nprotocol wiki-v1, {base.quality.tokens:,} tokens, {torch.get_num_threads()} threads; "
          f"base decode {base.speed.decode_tokens_per_s:.1f} tok/s, prefill {base.speed.prefill_tokens_per_s:.0f} tok/s\n"
          if base.speed else "")  # fmt: skip
    print(table(base, rows))
    if args.json:
        doc = {"base": base.to_dict(), "recipes": [dict(r.to_dict(), compress_seconds=s, compress_peak_rss_mb=m) for r, s, m in rows]}
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
