"""Unstructured and N:M pruning on the built-in model, protocol wiki-v1, one run.

    .venv/bin/python benchmarks/prune.py [--samples 128] [--tokens 16384] [--threads 2] [--gradual-steps 40]
                                         [--only "wanda 2:4,sparsegpt 50%"] [--no-speed] [--csr] [--json out.json]

The full table (what benchmarks/RESULTS.md should carry, on a quiet machine):

    .venv/bin/python benchmarks/prune.py --samples 128 --tokens 16384 --threads 2 --gradual-steps 40

Rows: dense; magnitude, Wanda and SparseGPT at 50% unstructured, 2:4 and 4:8;
SparseGPT 50% + int4-g64 in one pass (with dense RTN int4-g64 beside it);
gradual magnitude to 50% with a short training run (``--gradual-steps``
steps of 2 x 128 tokens on the calibration ids, distilled from the dense
model; about 15 s a step on one busy core here, forward, backward and the
teacher's forward). Each model is pruned from a fresh copy of the base, saved with
save_compressed, reloaded from disk and measured, so size and speed describe
the checkpoint a user gets. Calibration: the protocol's calibration split
through ``slimlm.eval.calibration_ids`` (``--samples`` sequences of 512
tokens, seed 0). "nonzero params" counts the model's parameters less the
pruned weights; "bpw" is the decoder linears' stored bits per weight,
positions (bitmask / N:M index) included; speed columns are ratios to the
dense model measured in the same process (batch 1, 512-token prompt, 128 new
tokens): on CPU the pruned weight is decompressed at load and runs dense, so
expect ~1.0x; ``--csr`` adds a magnitude 50% row run with torch.sparse CSR matmuls instead.
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
from slimlm.nn import SparseLinear, SparseQuantLinear
from slimlm.prune import GradualMagnitude, Magnitude, SparseGPT, Wanda
from slimlm.quant import RTN
from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"


def methods(gradual_steps: int, csr: bool) -> list[tuple[str, list[object], str | None]]:
    """(row name, recipe steps, sparse kernel to force or None)."""
    rows: list[tuple[str, list[object], str | None]] = []
    for pattern, label in (("unstructured", "50%"), ("2:4", "2:4"), ("4:8", "4:8")):
        rows += [(f"magnitude {label}", [Magnitude(pattern=pattern)], None),
                 (f"wanda {label}", [Wanda(pattern=pattern)], None),
                 (f"sparsegpt {label}", [SparseGPT(pattern=pattern)], None)]  # fmt: skip
    if csr:
        rows.append(("magnitude 50% (CSR kernel)", [Magnitude()], "sparse-csr"))  # speed only: any 50% mask
    rows += [("rtn int4-g64 (dense)", [RTN(scheme="int4-g64")], None),
             ("sparsegpt 50% + int4-g64", [SparseGPT(scheme="int4-g64")], None),
             (f"gradual magnitude 50% ({gradual_steps} steps)",
              [GradualMagnitude(sparsity=0.5, steps=gradual_steps, prune_every=max(1, gradual_steps // 8),
                                prune_end=0.75, seq_len=128, batch_size=2, lr=5e-5)], None)]  # fmt: skip
    return rows


def nonzero_params(model: torch.nn.Module, r: Result) -> int:
    """Parameters less the pruned weights (a pruned linear's logical size minus what it keeps)."""
    pruned = sum(m.weight_storage()[0] - m.kept for m in model.modules()
                 if isinstance(m, (SparseLinear, SparseQuantLinear)))  # fmt: skip
    return r.size.params - pruned


def measure(name: str, steps: list[object], kernel: str | None, *, tmp: Path, common: dict,
            calib: torch.Tensor) -> tuple[Result, float, int]:  # fmt: skip
    model, tok = load_model(MODEL)
    t0 = time.perf_counter()
    apply_all(model, steps, calib if needs_calibration(steps) else None)
    seconds = time.perf_counter() - t0
    out = save_compressed(model, tok, tmp / "ckpt", base_model=MODEL, recipe={"name": name}, overwrite=True)
    del model
    model, tok = load_compressed(out)
    if kernel is not None:
        for m in model.modules():
            if isinstance(m, SparseLinear):
                m.set_kernel(kernel)
    r = evaluate(model, tok, source=name, model_id=None, base_source=MODEL, base_id=model_id(MODEL),
                 load_base=lambda: load_model(MODEL)[0], model_dir=str(out), **common)  # fmt: skip
    return r, seconds, nonzero_params(model, r)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def row(name: str, r: Result, base: Result, seconds: float, nonzero: int) -> str:
    sp, bsp = r.speed, base.speed
    return " | ".join([
        name, *quality_cells(r, base.quality.perplexity), f"{nonzero / 1e6:.1f} M",
        f"{(r.size.checkpoint_bytes or 0) / 1e6:.0f}",
        _ratio(sp and sp.prefill_tokens_per_s, bsp and bsp.prefill_tokens_per_s),
        _ratio(sp and sp.decode_tokens_per_s, bsp and bsp.decode_tokens_per_s), f"{seconds:.0f}",
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128, help="calibration sequences of 512 tokens (protocol: 128)")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (protocol: 16384)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradual-steps", type=int, default=40)
    p.add_argument("--only", default=None, help="comma list of row names to run, e.g. 'wanda 2:4,sparsegpt 50%%'")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--csr", action="store_true", help="also time magnitude 50%% with torch.sparse CSR matmuls")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    common = dict(protocol="wiki-v1", n_tokens=args.tokens, speed=not args.no_speed)
    model, tok = load_model(MODEL)
    base = evaluate(model, tok, source=MODEL, model_id=model_id(MODEL), model_dir=model_dir(MODEL), **common)
    calib = calibration_ids(tok, "wiki-v1", n_samples=args.samples)
    del model
    head = ("method", "ppl", "Δppl", "KLD", "top-1", "bpw", "nonzero params", "ckpt MB", "prefill", "decode",
            "prune s")  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines.append(row("dense", base, base, 0.0, base.size.params))
    print(lines[-1], flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, steps, kernel in methods(args.gradual_steps, args.csr):
            if args.only and name not in args.only.split(","):
                continue
            r, seconds, nonzero = measure(name, steps, kernel, tmp=Path(tmp), common=common, calib=calib)
            results.append((name, r, seconds, nonzero))
            lines.append(row(name, r, base, seconds, nonzero))
            print(lines[-1], flush=True)
    speed = (f"; dense decode {base.speed.decode_tokens_per_s:.1f} tok/s, prefill "
             f"{base.speed.prefill_tokens_per_s:.0f} tok/s" if base.speed else "")  # fmt: skip
    print(f"\nprotocol wiki-v1, {base.quality.tokens:,} eval tokens; calibration {calib.shape[0]} x {calib.shape[1]} "
          f"tokens (seed 0); {torch.get_num_threads()} thread(s){speed}\n")  # fmt: skip
    print("\n".join(lines))
    if args.json:
        doc = {"base": base.to_dict(), "rows": [dict(r.to_dict(), name=n, prune_seconds=s, nonzero_params=z)
                                                for n, r, s, z in results]}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
