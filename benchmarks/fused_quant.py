"""Fused quantized q/k/v and gate/up in the fast decoder: decode speed and memory, fused vs one call per linear.

    .venv/bin/python benchmarks/fused_quant.py [--threads 1] [--new-tokens 64] [--runs 5] [--scheme int4-g64]
        [--rss share|copy] [--clock wall|cpu]

A SmolLM2-135M-shaped random llama (hidden 576, intermediate 1536, 9 heads, 3 KV heads, 30 layers, vocab 49152,
tied), built from a LlamaConfig (no download), RTN-quantized in ``--scheme`` (decoder linears; the tied
lm_head stays float32). Greedy decode from a fixed 32-token prompt:

1. decode tok/s = (N - 1) / (t(N) - t(1)), fused (``FastDecoder(fuse=True)``) and unfused (``fuse=False``),
   interleaved run by run; medians and their ratio. The same greedy tokens are required.
2. one layer's q/k/v + gate/up matmuls at one row: 5 kernel calls vs 2 (median ms, ratio).
3. ``--rss share|copy``: resident memory before and after building the fused decoder, with the parts holding
   views of the fused tensors (share, the default path) or keeping their own (copy). Run each in its own
   process so the numbers do not mix.

The machine is shared: read ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slimlm.api import apply
from slimlm.formats import parse_scheme
from slimlm.generation import GenerationConfig
from slimlm.generation import decoder as decoder_mod
from slimlm.generation.decoder import FastDecoder
from slimlm.generation.loop import decode_steps
from slimlm.nn.fused_quant import FusedQuantLinear
from slimlm.quant import RTN

CLOCK = time.perf_counter  # --clock cpu: time.process_time (at 1 thread it ignores waits for a busy CPU)
PROMPT = [1] + [(i * 7919) % 49000 + 100 for i in range(31)]


def smollm2_shaped(scheme: str):
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=100000.0)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return apply(model, RTN(scheme=parse_scheme(scheme)))


def run(dec, n: int) -> tuple[list[int], float]:
    t0 = CLOCK()
    toks = [int(t[0]) for t in decode_steps(dec, [PROMPT], GenerationConfig(max_new_tokens=n))]
    return toks, CLOCK() - t0


def speed(model, new_tokens: int, runs: int) -> str:
    build = {}
    for k, fuse in (("unfused", False), ("fused", True)):
        t0 = CLOCK()
        FastDecoder(model, fuse=fuse)
        build[k] = CLOCK() - t0
    decs = {"unfused": FastDecoder(model, fuse=False), "fused": FastDecoder(model, fuse=True)}
    for d in decs.values():
        run(d, 4)  # warm-up (first-use checks, kernel choices)
    rates: dict[str, list[float]] = {k: [] for k in decs}
    toks = {}
    for _ in range(runs):  # interleaved: load changes hit both alike
        for k, d in decs.items():
            toks[k], tn = run(d, new_tokens)
            _, t1 = run(d, 1)
            rates[k].append((new_tokens - 1) / max(tn - t1, 1e-9))
    med = {k: statistics.median(v) for k, v in rates.items()}
    same = "yes" if toks["fused"] == toks["unfused"] else "NO"
    return (f"decode tok/s (median of {runs}): unfused {med['unfused']:.1f}, fused {med['fused']:.1f}; "
            f"fused / unfused = {med['fused'] / med['unfused']:.3f}x; same tokens: {same}\n"
            f"  per run fused/unfused: {[round(f / u, 3) for f, u in zip(rates['fused'], rates['unfused'])]}\n"
            f"  building the decoder: unfused {build['unfused']:.2f} s, fused {build['fused']:.2f} s")


def layer_matmuls(model, reps: int = 200) -> str:
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    parts = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
    fused = [FusedQuantLinear(parts[:3], share=False), FusedQuantLinear(parts[3:], share=False)]
    x = torch.randn(1, 576)
    times: dict[str, list[float]] = {"5 calls": [], "2 fused": []}
    with torch.no_grad():
        for _ in range(3):
            [f(x) for f in parts + fused]
        for _ in range(reps):
            for k, fns in (("5 calls", parts), ("2 fused", fused)):
                t0 = CLOCK()
                for f in fns:
                    f(x)
                times[k].append(CLOCK() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return (f"layer 0 q/k/v + gate/up at 1 row: 5 calls {med['5 calls']:.3f} ms, 2 fused {med['2 fused']:.3f} ms; "
            f"ratio {med['5 calls'] / med['2 fused']:.2f}x")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def rss(model, mode: str) -> str:
    if mode == "copy":  # the fused decoder keeps its own tensors; the parts keep theirs
        class Copying(FusedQuantLinear):
            def __init__(self, mods, *, share: bool = False) -> None:
                super().__init__(mods, share=False)

        decoder_mod.FusedQuantLinear = Copying
    gc.collect()
    before = rss_mb()
    dec = FastDecoder(model, fuse=True)
    gc.collect()
    after = rss_mb()
    fused = [f for layer in dec.layers for f in (layer.qkv, layer.gate_up)]
    held = sum(t.numel() * t.element_size() for f in fused for t in f._weight.values()) / 2**20
    shared = sum(len(k) for f in fused for k in f.shared.values()) if mode == "share" else 0
    return (f"rss ({mode}): {before:.0f} MB -> {after:.0f} MB after the fused decoder (+{after - before:.1f} MB); "
            f"fused tensors {held:.1f} MB; part tensors turned into views: {shared}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scheme", default="int4-g64")
    parser.add_argument("--rss", choices=("share", "copy"), default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    model = smollm2_shaped(args.scheme)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} scheme={args.scheme} clock={args.clock}",
          flush=True)
    if args.rss:
        print(rss(model, args.rss), flush=True)
        return
    print(layer_matmuls(model), flush=True)
    print(speed(model, args.new_tokens, args.runs), flush=True)


if __name__ == "__main__":
    main()
