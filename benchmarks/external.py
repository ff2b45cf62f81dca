"""slimlm vs llm-compressor side by side: same model, same calibration ids, same evaluator, same threads.

Setup, once (a separate venv OUTSIDE the repo; never install into .venv):

    python3.11 -m venv /work/ext-venv
    /work/ext-venv/bin/pip install torch==2.13.0          # first and pinned: the local CPU wheel, not a CUDA build
    /work/ext-venv/bin/pip install llmcompressor==0.14.0.1 # + transformers 5.17.0, compressed-tensors 0.19.0

Run (from the repository root, slimlm's own venv):

    .venv/bin/python benchmarks/external.py [--samples 32] [--tokens 8192] [--threads 1]
        [--rows slimlm:gptq,llmcompressor:gptq] [--ext-python /work/ext-venv/bin/python] [--work DIR] [--reuse]

1. slimlm's protocol calibration batch (``calibration_ids(tok, "wiki-v1",
   n_samples=N)``, ``(N, 512)`` ids) is saved once and both tools read that file.
2. Every row compresses the base SmolLM2-135M in a fresh child process with
   ``--threads`` torch threads (``OMP_NUM_THREADS`` too); the seconds are
   those of the compression call alone (slimlm ``apply``; llm-compressor
   ``oneshot``), model loading and export excluded. A pair's two rows run back
   to back. slimlm's result is saved with ``save_compressed`` and written out
   by ``export_hf`` as a plain dequantized HF directory; llm-compressor's by
   benchmarks/external_llmcompressor.py as the same kind of directory.
3. Every directory, and the base, is scored by ``slimlm eval DIR --base
   smollm2-135m --no-speed --tokens T`` (protocol wiki-v1; KLD and top-1
   agreement against the base on the same windows).

All rows are 4-bit asymmetric weights in groups of 64 on every decoder-block
linear (lm_head/embeddings kept in float): 4.50 bits per weight counting a
16-bit scale and zero per group. Settings matched per pair: dampening 0.01 of
the mean Hessian diagonal, lazy block 128, group parameters from the float
weights before the solve ("static groups"; llm-compressor's only mode),
calibration batch 8, no true-sequential within a block (both quantize every
linear of a block from the block's inputs, then re-run the block).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
REPO = Path(__file__).resolve().parent.parent
EXT_SCRIPT = Path(__file__).resolve().parent / "external_llmcompressor.py"

# row key -> what it runs; a pair is the same key with both implementations
SETTINGS = {
    "rtn": "round to nearest",
    "gptq": "GPTQ, no act-order",
    "gptq-actorder": "GPTQ, act-order (static groups)",
    "awq": "AWQ s = mean|x|^a, no clip search",
    "awq-clip": "AWQ + clip search (slimlm default)",
    "awq-duo": "AWQ duo scaling (llm-compressor default)",
}
DEFAULT_ROWS = ("slimlm:rtn,llmcompressor:rtn,slimlm:gptq,llmcompressor:gptq,slimlm:gptq-actorder,"
                "llmcompressor:gptq-actorder,slimlm:awq,llmcompressor:awq,slimlm:awq-clip,llmcompressor:awq-duo")  # fmt: skip
SLIMLM_METHODS = ("rtn", "gptq", "gptq-actorder", "awq", "awq-clip")
EXT_METHODS = ("rtn", "gptq", "gptq-actorder", "awq", "awq-duo")


def slimlm_config(method: str) -> object:
    from slimlm.quant import GPTQ, RTN
    from slimlm.quant.awq_handler import AWQ

    scheme = "int4-g64"  # IntScheme(bits=4, symmetric=False, PerGroup(64))
    return {
        "rtn": lambda: RTN(scheme=scheme),
        "gptq": lambda: GPTQ(scheme=scheme, act_order=False, percdamp=0.01, blocksize=128, batch_size=8),
        "gptq-actorder": lambda: GPTQ(scheme=scheme, act_order=True, percdamp=0.01, blocksize=128, batch_size=8),
        "awq": lambda: AWQ(scheme=scheme, clip_search=False, grid=20, batch_size=8),
        "awq-clip": lambda: AWQ(scheme=scheme, grid=20, batch_size=8),
    }[method]()


def run_slimlm_one(method: str, calib_path: Path, out: Path, threads: int) -> dict:
    """Child process: compress with slimlm, save, export a plain HF dir; returns the timing record."""
    from slimlm.api import apply
    from slimlm.io import export_hf, save_compressed
    from slimlm.models import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(MODEL)
    calib = torch.load(calib_path)
    config = slimlm_config(method)
    t0, c0 = time.perf_counter(), time.process_time()
    apply(model, config, calib)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ckpt = out.with_name(out.name + "-ckpt")
    save_compressed(model, tok, ckpt, base_model=MODEL, overwrite=True)
    export_hf(ckpt, out, overwrite=True)
    return {"method": method, "seconds": seconds, "cpu_seconds": cpu_seconds, "threads": threads,
            "calib": list(calib.shape)}  # fmt: skip


def _child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def compress(impl: str, method: str, calib: Path, out: Path, args: argparse.Namespace) -> dict:
    done = out.with_name(out.name + ".json")
    if args.reuse and done.is_file() and out.is_dir():
        return json.loads(done.read_text())
    if impl == "slimlm":
        cmd = [sys.executable, __file__, "--one", method, "--calib", str(calib), "--out", str(out)]
    else:
        cmd = [args.ext_python, str(EXT_SCRIPT), "--method", method, "--model", str(args.model_dir),
               "--calib", str(calib), "--out", str(out), "--overwrite"]  # fmt: skip
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=_child_env(args.threads), capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"error: {impl} {method} failed (exit {proc.returncode})")
    record = _last_json(proc.stdout)
    done.write_text(json.dumps(record) + "\n")
    return record


def evaluate_dir(source: str, json_path: Path, args: argparse.Namespace):
    from slimlm.eval import load_result

    if not (args.reuse and json_path.is_file()):
        cli = str(Path(sys.executable).parent / "slimlm")
        cmd = [cli, "--threads", str(args.threads), "eval", source, "--base", MODEL, "--no-speed",
               "--tokens", str(args.tokens), "--json", str(json_path), "--overwrite"]  # fmt: skip
        proc = subprocess.run(cmd, env=_child_env(args.threads), capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"error: slimlm eval {source} failed (exit {proc.returncode})")
    return load_result(json_path)


def parse_rows(spec: str) -> list[tuple[str, str]]:
    rows = []
    for item in spec.split(","):
        impl, _, method = item.partition(":")
        allowed = SLIMLM_METHODS if impl == "slimlm" else EXT_METHODS if impl == "llmcompressor" else None
        if allowed is None or method not in allowed:
            raise SystemExit(f"error: bad row {item!r}; use slimlm:{{{','.join(SLIMLM_METHODS)}}} or "
                             f"llmcompressor:{{{','.join(EXT_METHODS)}}}")  # fmt: skip
        rows.append((impl, method))
    return rows


def main() -> None:
    from slimlm.eval import calibration_ids
    from slimlm.models import load_model
    from slimlm.models.builtin import builtin_dir
    from _table import quality_cells  # benchmarks/ is on sys.path when a script runs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens (protocol: 128)")
    p.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (protocol default 16,384)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--ext-python", default="/work/ext-venv/bin/python")
    p.add_argument("--work", type=Path, default=Path("/tmp/slimlm-external"))
    p.add_argument("--reuse", action="store_true", help="keep compressed dirs and eval JSON already in --work")
    p.add_argument("--one", choices=SLIMLM_METHODS, help=argparse.SUPPRESS)  # child: one slimlm compression
    p.add_argument("--calib", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print(json.dumps(run_slimlm_one(args.one, args.calib, args.out, args.threads)))
        return
    rows = parse_rows(args.rows)
    if any(impl == "llmcompressor" for impl, _ in rows) and not Path(args.ext_python).is_file():
        raise SystemExit(f"error: no external venv at {args.ext_python}; create it as this file's docstring says "
                         "or pass --ext-python")  # fmt: skip
    args.model_dir = builtin_dir(MODEL)
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / f"calib_{args.samples}.pt"
    _, tok = load_model(MODEL)
    torch.save(calibration_ids(tok, "wiki-v1", n_samples=args.samples), calib)
    base = evaluate_dir(MODEL, args.work / f"base_{args.tokens}.json", args)
    base_ppl = base.quality.perplexity
    head = ("implementation", "method", "ppl", "Δppl", "KLD", "top-1", "compress s", "cpu s")
    lines = [" | ".join(head), " | ".join("---" for _ in head),
             " | ".join(["base (float32)", "", *quality_cells(base, base_ppl)[:4], "", ""])]  # fmt: skip
    print(lines[-1], flush=True)
    for impl, method in rows:
        tag = f"{impl}-{method}-n{args.samples}-t{args.threads}"
        out = args.work / tag
        record = compress(impl, method, calib, out, args)
        r = evaluate_dir(str(out), args.work / f"{tag}_{args.tokens}.json", args)
        cpu = record.get("cpu_seconds")
        lines.append(" | ".join([impl, SETTINGS[method], *quality_cells(r, base_ppl)[:4], f"{record['seconds']:.1f}",
                                 "-" if cpu is None else f"{cpu:.1f}"]))  # fmt: skip
        print(lines[-1], flush=True)
    print(f"\nprotocol wiki-v1, {base.quality.tokens:,} eval tokens; calibration {args.samples} x 512 tokens (seed 0), "
          f"the same ids for both; int4 asymmetric groups of 64 (4.50 bpw); {args.threads} torch thread(s)\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
