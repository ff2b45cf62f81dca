"""llama.cpp as a measured peer: slimlm's GGUF exports and llama.cpp's own quantizations, scored in llama.cpp.

    scripts/setup-llamacpp.sh                      # once: llama-cpp-python 0.3.36 into .venv (~4 min on 2 cores)
    .venv/bin/python benchmarks/engines.py [--rows f16,rtn-q8_0,gptq-q4_0,gptq-q4_1,awq-q4_1,llamacpp-q8_0,...]
        [--model smollm2-135m] [--protocol wiki-v1] [--tokens 16384] [--calib-samples 32] [--threads 2]
        [--new-tokens 64] [--runs 3] [--float-type f16] [--work out/engines] [--table] [--speed-again]

Rows (default: all, in this order):

- ``f16``: the uncompressed model (``save_compressed`` of it as loaded) exported with
  ``slimlm export --format gguf --float-type f16``.
- a slimlm recipe name (``rtn-q8_0``, ``gptq-q4_0``, ``gptq-q4_1``, ``awq-q4_1``, or any recipe that
  exports): ``compress(model, recipe, calib_samples=...)``, then ``export --format gguf`` (code for code);
  floats as ``--float-type``.
- ``llamacpp-<type>`` (``q8_0``, ``q4_0``, ``q4_1``, ``q4_k_m``): llama.cpp's own quantization of the
  ``f16`` row's file through ``llama_cpp.llama_model_quantize`` with its default parameters (what
  ``llama-quantize`` does: its own choice of type for the embeddings/output and the K-quant mixes).

Each GGUF is loaded in llama.cpp and scores the protocol's evaluation windows (``eval_windows``, the
same windows slimlm scores): logits for every position of each window (``logits_all``, ``n_ctx`` =
window), every next token scored as slimlm's ``score_windows`` does, KLD against slimlm's cached base
outputs (``base_stats_for``: the base's top-k log-probabilities) with ``kl_to_base``. The same file or
checkpoint is scored by slimlm: a recipe row's reloaded checkpoint (its own modules), the ``f16`` row's
float model, and a ``llamacpp-*`` row's GGUF dequantized to float by transformers' GGUF loader (a check of
llama.cpp's arithmetic on the same weights). ``ppl diff`` is llama.cpp's perplexity over slimlm's, minus
one (target: within 1%). Decode speed: greedy, ``--new-tokens`` after the protocol's prompt, ``--threads``
in both engines, median of ``--runs`` after a warm-up; slimlm's own decode loop (``measure_speed``: the
fast decoder, eager, with ``--compile`` also its compiled step, with ``--kv-dtype float16`` also over a float16
KV cache, as llama.cpp's default cache is) runs the recipe rows' checkpoints and
the float model (float32), not the dequantized llama.cpp files. ``gptq-q4_0-head8-shared`` and
``rtn-q8_0-shared`` are the rows in llama.cpp's Q4_0 and Q8_0 layouts (a quantized head shared with the
embedding) to set beside ``llamacpp-q4_0`` and ``llamacpp-q8_0`` for decode speed.

``weight err`` is how far a row moved the decoder-block weights from the F16 export (relative squared
error, both files dequantized by gguf-py). Mind the built-in model: its weights come from a Q4_1 GGUF
(embeddings Q8_0), so they already lie on Q4_1's grid and llama.cpp's own Q4_1 (and Q8_0) of the F16
export only finds them again (weight err ~1e-7, KLD ~0); the headline flags such a pair. Q4_0 and
Q4_K_M re-round onto other grids and compare quantizers. On SmolLM2-135M (576 columns, not a multiple
of 256) llama.cpp's K-quants fall back to Q5_0/Q8_0 for most matrices: see the ``linears`` column.

Each row runs once and is kept in ``--work/rows.json`` (a row there is skipped); checkpoints and GGUF
files stay in ``--work``. ``--speed-again`` re-times the stored rows in both engines (decode
speed wants a quiet machine; the quality columns do not). ``--table`` prints what is stored, with the headline: slimlm's calibrated
4-bit rows against llama.cpp's own quantization to the same GGUF type (KLD measured in llama.cpp).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf import quants as gguf_quants

from slimlm.eval import get_protocol, measure_speed
from slimlm.eval.protocol import Protocol, for_tokenizer
from slimlm.eval.quality import BaseStats, kl_to_base, score_windows, token_nll
from slimlm.eval.runner import base_stats_for, eval_tokens, eval_windows
from slimlm.export import export
from slimlm.fsutil import atomic_write_text
from slimlm.io import load_compressed, save_compressed
from slimlm.models import load_model
from slimlm.models.identity import model_id
from slimlm.pipelines.compress import compress

from _engines_table import table  # benchmarks/ is on sys.path when a script runs
from _llamacpp import llama_model, llamacpp_quantize, llamacpp_speed

MODEL = "smollm2-135m"
SLIMLM_ROWS = ("rtn-q8_0", "rtn-q8_0-shared", "gptq-q4_0", "gptq-q4_0-head8-shared", "gptq-q4_1", "awq-q4_1")
LLAMACPP_ROWS = {"llamacpp-q8_0": "Q8_0", "llamacpp-q4_0": "Q4_0", "llamacpp-q4_1": "Q4_1",
                 "llamacpp-q4_k_m": "Q4_K_M"}  # fmt: skip
DEFAULT_ROWS = ("f16", *SLIMLM_ROWS, *LLAMACPP_ROWS)
# the settings every stored row shares; a --work measured with others is refused
SETTINGS = ("model", "protocol", "tokens", "calib_samples", "threads", "new_tokens", "float_type")


# --- pure functions (tested without llama.cpp) --------------------------------------------------


def window_scores(logits: np.ndarray, window: torch.Tensor, ref_idx: torch.Tensor,
                  ref_logp: torch.Tensor) -> tuple[float, float, float]:  # fmt: skip
    """One window's logits from any engine, scored as ``score_windows`` scores slimlm's.

    logits (T, V) float, window (T,) ids, ref_idx/ref_logp (T-1, k) the base's top-k at positions
    0..T-2 -> (mean NLL of tokens 1..T-1, mean KL(base || engine), top-1 agreement with the base).
    """
    logp = F.log_softmax(torch.as_tensor(np.asarray(logits[:-1]), dtype=torch.float32), dim=-1)  # (T-1, V)
    nll = token_nll(logp, window).double().mean().item()
    kl = kl_to_base(logp, ref_idx, ref_logp).double().mean().item()
    agree = (logp.argmax(-1) == ref_idx[:, 0].long()).double().mean().item()
    return nll, kl, agree


def summarize(per_window: list[tuple[float, float, float]]) -> dict[str, float]:
    """Per-window (NLL, KL, agreement) -> perplexity (exp of the token mean: windows are equal), KLD, top-1."""
    nll, kl, agree = (statistics.fmean(col) for col in zip(*per_window))
    return dict(ppl=math.exp(nll), nll=nll, kld=kl, top1=agree)


def _block_matrices(tensors: list[Any]) -> dict[str, Any]:
    return {t.name: t for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """File size, bits per weight of the decoder-block matrices (bytes as stored), their types, the embedding's."""
    tensors = GGUFReader(path).tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    elems: dict[str, int] = {}
    for t in (linears := list(_block_matrices(tensors).values())):
        elems[t.tensor_type.name] = elems.get(t.tensor_type.name, 0) + int(t.n_elements)
    return dict(size_mb=Path(path).stat().st_size / 1e6,
                linear_bpw=8 * sum(int(t.n_bytes) for t in linears) / sum(int(t.n_elements) for t in linears),
                linear_types=dict(sorted(elems.items(), key=lambda kv: -kv[1])), embd=types["token_embd.weight"],
                output=types.get("output.weight", "tied"))  # fmt: skip


def weight_error(path: str | os.PathLike, reference: str | os.PathLike) -> float:
    """sum ||W - W_ref||^2 / sum ||W_ref||^2 over the decoder-block matrices of two GGUFs (dequantized by gguf-py).

    Against the F16 export it says how far a quantization moved the weights; ~1e-7 (F16 rounding)
    means the reference's weights already lay on that grid and the quantizer only found them again.
    """
    ours, num, den = _block_matrices(GGUFReader(path).tensors), 0.0, 0.0
    for name, t in _block_matrices(GGUFReader(reference).tensors).items():
        r = gguf_quants.dequantize(t.data, t.tensor_type).astype(np.float64)  # (out, in)
        w = gguf_quants.dequantize(ours[name].data, ours[name].tensor_type).astype(np.float64)
        num, den = num + float(((w - r) ** 2).sum()), den + float((r**2).sum())
    return num / den


# --- llama.cpp (llama-cpp-python, optional: scripts/setup-llamacpp.sh; loading and timing in _llamacpp.py) --


def llamacpp_quality(path: Path, windows: torch.Tensor, base: BaseStats, *, threads: int) -> dict[str, float]:
    """llama.cpp's logits for every position of each window of (W, T), each from an empty cache, scored."""
    T = windows.shape[1]
    llm, per_window = llama_model(path, n_ctx=T, threads=threads, logits_all=True), []
    for w in range(windows.shape[0]):
        llm.reset()
        llm.eval(windows[w].tolist())
        per_window.append(window_scores(llm.scores[:T], windows[w], base.topk_idx[w], base.topk_logp[w]))
    llm.close()
    return summarize(per_window)


# --- rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What every row shares: the settings, the windows slimlm scores, the base's outputs on them, the prompt."""

    args: argparse.Namespace
    proto: Protocol
    windows: torch.Tensor  # (W, T) token ids
    base: BaseStats
    prompt: torch.Tensor  # (P,) the speed workload's prompt, BOS first when the windows have it

    @property
    def work(self) -> Path:
        return Path(self.args.work)


def speed_prompt(tokens: torch.Tensor, proto: Protocol) -> torch.Tensor:
    """The speed workload's prompt (P,): the protocol's first ``prompt_tokens`` tokens, BOS first when it has one."""
    bos = [] if proto.bos is None else [proto.bos]
    return torch.tensor(bos + tokens[: proto.prompt_tokens - len(bos)].tolist())


def setup(args: argparse.Namespace) -> Bench:
    model, tok = load_model(args.model)
    proto = for_tokenizer(get_protocol(args.protocol), tok)
    tokens = eval_tokens(tok, proto)  # (N,)
    windows = eval_windows(tokens, proto, n_tokens=args.tokens, full=False)
    prompt = speed_prompt(tokens, proto)
    base = base_stats_for(windows, proto, base_id=model_id(args.model), load_base=lambda: model)
    return Bench(args, proto, windows, base, prompt)


def _quality(q) -> dict[str, float]:
    return dict(ppl=q.perplexity, nll=q.nll, kld=q.kld or 0.0, top1=q.top1_agreement or 1.0)


def _slimlm_speed(model, bench: Bench) -> dict[str, Any]:
    """slimlm's loop (``measure_speed``); with ``--compile`` also its compiled step, in the same process."""
    args = bench.args
    s = measure_speed(model, bench.prompt, new_tokens=args.new_tokens, runs=args.runs)
    out = dict(prefill_tok_s=s.prefill_tokens_per_s, decode_tok_s=s.decode_tokens_per_s, loop=s.loop)
    if args.compile:
        c = measure_speed(model, bench.prompt, new_tokens=args.new_tokens, runs=args.runs, compile=True)
        out.update(decode_compiled_tok_s=c.decode_tokens_per_s, compiled_loop=c.loop)
    if args.kv_dtype:  # llama.cpp's own default cache is f16
        k = measure_speed(model, bench.prompt, new_tokens=args.new_tokens, runs=args.runs, compile=args.compile,
                          kv_dtype=args.kv_dtype)
        out.update(decode_kv_tok_s=k.decode_tokens_per_s, kv_loop=k.loop)
    return out


def f16_gguf(bench: Bench) -> Path:
    """The uncompressed model as an F16 GGUF (made once): ``save_compressed`` of it as loaded, then exported."""
    path = bench.work / "gguf" / "f16.gguf"
    if not path.is_file():
        model, tok = load_model(bench.args.model)
        ckpt = save_compressed(model, tok, bench.work / "ckpt" / "f16", base_model=bench.args.model, overwrite=True)
        export(ckpt, path, format="gguf", float_type="f16", overwrite=True)
    return path


def slimlm_side(row: str, bench: Bench) -> tuple[Path, dict[str, Any]]:
    """Make the row's GGUF; -> (path, slimlm's own numbers for the same weights)."""
    args = bench.args
    if row == "f16":
        path = f16_gguf(bench)
        model, _ = load_model(args.model)
        quality, _ = score_windows(model, bench.windows, base=bench.base)
        return path, dict(slimlm=_quality(quality), slimlm_speed=_slimlm_speed(model, bench), runs_as="float32")
    path = bench.work / "gguf" / f"{row}.gguf"
    if row in LLAMACPP_ROWS:
        t0 = time.perf_counter()
        llamacpp_quantize(f16_gguf(bench), path, LLAMACPP_ROWS[row], threads=args.threads)
        seconds = time.perf_counter() - t0
        model, _ = load_model(str(path))  # dequantized by transformers' GGUF loader: same weights, float32
        quality, _ = score_windows(model, bench.windows, base=bench.base)
        return path, dict(slimlm=_quality(quality), slimlm_speed=None, seconds=seconds, runs_as="dequantized float32")
    ckpt = bench.work / "ckpt" / row
    report = compress(args.model, row, out=ckpt, protocol=args.protocol, calib_samples=args.calib_samples,
                      tokens=args.tokens, speed=False, overwrite=True)  # fmt: skip
    export(ckpt, path, format="gguf", float_type=args.float_type, overwrite=True)
    model, _ = load_compressed(ckpt)
    return path, dict(slimlm=_quality(report.compressed.quality), slimlm_speed=_slimlm_speed(model, bench),
                      seconds=report.seconds, runs_as="compressed modules")  # fmt: skip


def run_row(row: str, bench: Bench) -> dict[str, Any]:
    t0 = time.perf_counter()
    path, measured = slimlm_side(row, bench)
    gc.collect()
    args = bench.args
    llama = llamacpp_quality(path, bench.windows, bench.base, threads=args.threads)
    speed = llamacpp_speed(path, bench.prompt.tolist(), new_tokens=args.new_tokens, threads=args.threads,
                           runs=args.runs)  # fmt: skip
    werr = 0.0 if row == "f16" else weight_error(path, f16_gguf(bench))
    return dict(gguf=str(path), **gguf_summary(path), weight_error=werr, llamacpp=llama, llamacpp_speed=speed,
                ppl_diff=llama["ppl"] / measured["slimlm"]["ppl"] - 1, **measured,
                minutes=(time.perf_counter() - t0) / 60)  # fmt: skip


def speed_again(row: str, r: dict[str, Any], bench: Bench) -> None:
    """Re-time a stored row in both engines (``--speed-again``: quality measured under load, speed when quiet)."""
    args = bench.args
    r["llamacpp_speed"] = llamacpp_speed(Path(r["gguf"]), bench.prompt.tolist(), new_tokens=args.new_tokens,
                                         threads=args.threads, runs=args.runs)  # fmt: skip
    if r["slimlm_speed"] is not None:
        model = load_model(args.model)[0] if row == "f16" else load_compressed(bench.work / "ckpt" / row)[0]
        r["slimlm_speed"] = _slimlm_speed(model, bench)
    r["speed_timed"] = time.strftime("%Y-%m-%d %H:%M")


# --- driver -----------------------------------------------------------------------------------------


def save(args: argparse.Namespace, store: dict[str, Any]) -> None:
    atomic_write_text(Path(args.work) / "rows.json", json.dumps(store, indent=1) + "\n")


def load_store(args: argparse.Namespace) -> dict[str, Any]:
    """The stored rows; refused when they were measured with other settings (they would not compare)."""
    path = Path(args.work) / "rows.json"
    settings = {k: getattr(args, k) for k in SETTINGS}
    store = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "rows": {}}
    if store["settings"] != settings and not (args.table and not args.rows):
        diff = {k: (store["settings"].get(k), v) for k, v in settings.items() if store["settings"].get(k) != v}
        raise SystemExit(f"{path} holds rows measured with other settings (stored, given: {diff}); "
                         "pass the same settings or another --work")  # fmt: skip
    return store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=None, help=f"comma list: f16, a recipe name, or {', '.join(LLAMACPP_ROWS)} "
                   f"(default: {','.join(DEFAULT_ROWS)}; none with --table)")  # fmt: skip
    p.add_argument("--model", default=MODEL, help="built-in name or model directory (the base)")
    p.add_argument("--protocol", default="wiki-v1")
    p.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's 16,384)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences for the recipes")
    p.add_argument("--threads", type=int, default=2, help="threads in both engines")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy decode length for the speed columns")
    p.add_argument("--runs", type=int, default=3, help="timed decode runs (median) after one warm-up")
    p.add_argument("--float-type", default="f16", help="float parts of the recipe rows' GGUF (export --float-type)")
    p.add_argument("--work", default="out/engines")
    p.add_argument("--table", action="store_true", help="print the stored table (and run nothing unless --rows)")
    p.add_argument("--kv-dtype", default=None, choices=("float16", "bfloat16"),
                   help="also time slimlm's loop (compiled with --compile) over a KV cache of this dtype")
    p.add_argument("--compile", action="store_true",
                   help="also time slimlm's compiled decode step (slimlm.generation.compiled)")
    p.add_argument("--speed-again", action="store_true",
                   help="re-time the stored rows (or --rows) in both engines, keeping their quality numbers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rows is None:
        args.rows = "" if args.table or args.speed_again else ",".join(DEFAULT_ROWS)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    store = load_store(args)
    if args.speed_again:
        bench = setup(args)
        for row in [r for r in args.rows.split(",") if r in store["rows"]] or list(store["rows"]):
            logging.info("timing %s again", row)
            speed_again(row, store["rows"][row], bench)
            save(args, store)
    todo = [r for r in args.rows.split(",") if r and r not in store["rows"]]
    if todo and not args.speed_again:
        bench = setup(args)
        store.update(protocol=bench.proto.name, tokens=bench.windows.numel(), windows=bench.windows.shape[0],
                     prompt_tokens=len(bench.prompt))  # fmt: skip
        for row in todo:
            logging.info("row %s", row)
            store["rows"][row] = run_row(row, bench)
            save(args, store)
    if store["rows"]:
        print(table(store))


if __name__ == "__main__":
    main()
