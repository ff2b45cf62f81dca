"""Decode speed of slimlm's generation loop vs HF generate, batch scaling and paged-cache memory.

    .venv/bin/python benchmarks/decode.py [--threads 2] [--prompt-tokens 64] [--new-tokens 64] [--runs 3]
        [--variants base,bf16,int8,int4,int4-head8,int3] [--batches 1,4,16] [--compile] [--kv-dtype float16]
        [--clock wall|cpu]
        [--only speed,profile,batch,paged] [--allow-slow]

1. batch 1, per variant (base fp32; base cast to bf16; int8 = RTN int8 per channel, symmetric, the
   int8 weight-only kernel; int4 = recipe rtn-int4-g64; int4-head8 = rtn-int4-g64-head8, lm_head int8 per
   channel on the int8 kernel, the embedding left a float lookup table; int3 = rtn-int3-g64, 3-bit codes on
   the int4 kernel): decode tokens/s of HF ``generate``
   and of slimlm's loop (eager, and compiled with --compile), as ratios from one run; engines interleaved run by
   run, medians reported. Decode tok/s = (N - 1) / (t(N) - t(1)) with t(n) the wall time to generate n
   tokens greedily from the same prompt, so prefill is taken out the same way for both engines. "GB/s" =
   weight bytes read per token (slimlm.models.size) x tok/s; "% peak" against the machine's ~35 GB/s.
   "same" = slimlm's greedy tokens (eager, and compiled with --compile) equal HF's. --kv-dtype float16: also
   slimlm's loop (compiled with --compile) over a float16 KV cache, its tok/s against the float32 cache's in
   the same run, and whether its tokens still equal HF's. --compile:
   ``slimlm.generation.compiled.compile_step`` (inductor with its C++ wrapper on CPU); "compile s" is
   the first compiled call (cold: ~1.5 min; warm from inductor's on-disk cache: seconds to tens of
   seconds). The int8 and int4 rows stop the run (exit 1, naming the layer and the reason) when a layer
   did not run its fast kernel; --allow-slow times them anyway.
2. batch table (base model): prompts of mixed lengths, grouped by length with left padding; throughput
   (new tokens/s over the batch) and latency (ms per decode step = per token of each request).
3. profile: where a base-model step's time goes -- the full step, the same layer stack at hidden size
   64 (framework overhead only), the time to read every weight once with F.linear, the 35 GB/s bound.
4. paged vs contiguous KV memory on a mixed-length workload (prompts of varied lengths, generation until
   a newline / EOS or the budget): bytes per token from ``model_info`` (what ``slimlm info`` prints).

Machines here are shared: compare ratios within one run; the thread count is printed with every table.

Kernel paths are chosen by ``SLIMLM_KERNELS`` (slimlm.kernels.tune): unset = auto (timed once per shape on
this machine, cached in $SLIMLM_CACHE/kernels/), ``fixed`` = the hand-set rules, ``measure`` = re-time.
After each variant and the profile, the choices made (path and why per shape/rows/threads) are printed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from slimlm.api import apply
from slimlm.data import protocol_texts
from slimlm.models.size import bytes_read_per_token
from slimlm.formats import parse_scheme
from slimlm.kernels import dense, kernel_report, tune
from slimlm.generation import GenerationConfig, PagedKVCache, generate, make_decoder
from slimlm.generation.compiled import compile_step
from slimlm.generation.loop import decode_steps
from slimlm.models import load_model
from slimlm.models.info import model_info
from slimlm.quant import RTN
from slimlm.recipe import load_recipe
from _fast import expect_fast  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"
MACHINE_GBPS = 35.0
CLOCK = time.perf_counter  # --clock cpu: time.process_time (on-CPU time; at 1 thread it ignores waits for a busy CPU)
VARIANTS = ("base", "bf16", "int8", "int4", "int4-head8", "int3")
FAST_VARIANTS = ("int8", "int4", "int4-head8", "int3")  # every linear on a fast kernel on CPU and CUDA

# int3: 3-bit codes on the int4 kernel (it reads 4 bits a weight; "MB read" counts the 3.5 stored)
RECIPES = {"int4": "rtn-int4-g64", "int4-head8": "rtn-int4-g64-head8", "int3": "rtn-int3-g64"}


def build_variant(name: str):
    model, tok = load_model(MODEL)
    if name == "bf16":
        model = model.to(torch.bfloat16)
    elif name == "int8":
        apply(model, RTN(scheme=parse_scheme("int8-channel-sym")))
    elif name in RECIPES:  # int4-head8: lm_head int8 per channel too (untied from the embedding)
        for cfg in load_recipe(RECIPES[name]).steps:
            apply(model, cfg)
    elif name != "base":
        raise SystemExit(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    return model, tok


def prompt_ids(tok, n_tokens: int, *, doc: int = 0) -> list[int]:
    docs = protocol_texts("wiki-v1").evaluation
    ids: list[int] = []
    for text in docs[doc:]:
        ids += tok(text).input_ids
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise SystemExit(f"the evaluation text has fewer than {n_tokens} tokens")


# -- engines: each returns (generated ids, seconds) for n new tokens -------------------------------
def hf_run(model, ids: list[int], n: int) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    t0 = CLOCK()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist(), CLOCK() - t0


def slim_run(decoder, ids: list[int], n: int, step=None) -> tuple[list[int], float]:
    t0 = CLOCK()
    toks = [int(t[0]) for t in decode_steps(decoder, [ids], GenerationConfig(max_new_tokens=n), step=step)]
    return toks, CLOCK() - t0


def decode_tps(run, n: int, runs: int) -> tuple[float, list[int]]:
    """Median decode tokens/s over ``runs`` of (t(n) - t(1)), and the tokens of the last run."""
    rates = []
    for _ in range(runs):
        toks, tn = run(n)
        _, t1 = run(1)
        rates.append((n - 1) / max(tn - t1, 1e-9))
    return statistics.median(rates), toks


def _engines(args, model, ids) -> tuple[dict, dict, list]:
    """HF, slimlm's loop and (--compile) its compiled step; with --kv-dtype also both over that cache.
    Returns (engines by name, compile seconds by engine, compiled steps)."""
    engines, compile_s, steps = {"hf": lambda n: hf_run(model, ids, n)}, {}, []
    for suffix, kv_dtype in [("", None)] + ([(" kv", args.kv_dtype)] if args.kv_dtype else []):
        dec = make_decoder(model, kv_dtype=kv_dtype)
        engines["slimlm" + suffix] = lambda n, dec=dec: slim_run(dec, ids, n)
        if args.compile:
            step = compile_step(dec)
            t0 = time.perf_counter()
            slim_run(dec, ids, 4, step)  # compiles
            compile_s["compiled" + suffix] = time.perf_counter() - t0
            engines["compiled" + suffix] = lambda n, dec=dec, step=step: slim_run(dec, ids, n, step)
            steps.append(step)
        attention = "native kernel" if getattr(dec, "native_attention", False) else "torch SDPA"
        print(f"    one-token attention{suffix and f' ({kv_dtype} KV cache)'}: {attention}", flush=True)
    return engines, compile_s, steps


def speed_table(args) -> str:
    head = ("variant", "MB read/token", "HF tok/s", "slimlm tok/s", "slimlm / HF")
    head += ("compiled tok/s", "compiled / HF", "compile s", "compiled % of 35 GB/s") if args.compile else ()
    head += ("slimlm GB/s", "% of 35 GB/s", "same tokens")
    kv = "compiled kv" if args.compile else "slimlm kv"
    if args.kv_dtype:
        head += (f"{kv[:-3]} tok/s, {args.kv_dtype} KV", f"{args.kv_dtype} KV / float32 KV", "same tokens")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name in args.variants.split(","):
        model, tok = build_variant(name)
        ids = prompt_ids(tok, args.prompt_tokens)
        engines, compile_s, steps = _engines(args, model, ids)
        for run in engines.values():  # warm-up
            run(2)
        if name in FAST_VARIANTS:
            expect_fast(model, f"variant {name}", allow_slow=args.allow_slow)
        tps = {k: [] for k in engines}
        toks = {}
        for _ in range(args.runs):  # interleaved: load changes hit every engine alike
            for k, run in engines.items():
                rate, toks[k] = decode_tps(run, args.new_tokens, 1)
                tps[k].append(rate)
        med = {k: statistics.median(v) for k, v in tps.items()}
        per_token = bytes_read_per_token(model)
        gbps = per_token * med["slimlm"] / 1e9
        row = [name, f"{per_token / 1e6:.0f}", f"{med['hf']:.1f}", f"{med['slimlm']:.1f}",
               f"{med['slimlm'] / med['hf']:.2f}x"]
        if args.compile:
            failed = f" (FAILED: {steps[0].failed}; eager)" if steps[0].failed else ""
            row += [f"{med['compiled']:.1f}{failed}", f"{med['compiled'] / med['hf']:.2f}x",
                    f"{compile_s['compiled']:.0f}", f"{per_token * med['compiled'] / 1e9 / MACHINE_GBPS:.0%}"]
        float_kv = [t for k, t in toks.items() if " kv" not in k]
        same = all(t == toks["hf"] for t in float_kv)  # slimlm's loop (and its compiled step) vs HF
        row += [f"{gbps:.1f}", f"{gbps / MACHINE_GBPS:.0%}", "yes" if same else "NO"]
        if args.kv_dtype:
            half_same = all(t == toks["hf"] for k, t in toks.items() if " kv" in k)
            row += [f"{med[kv]:.1f}", f"{med[kv] / med[kv[:-3]]:.2f}x", "yes" if half_same else "NO"]
        lines.append(" | ".join(row))
        print(lines[-1], flush=True)
        print(_choices(model), flush=True)
        model = engines = steps = None  # free before the next variant loads
    return "\n".join(lines) + "\n\n" + tune.format_decisions()


def _choices(model) -> str:
    """Each quantized layer's one-row path and why (measured, cached, forced, fixed), grouped."""
    whys: dict[str, int] = {}
    for layer in kernel_report(model).layers:
        what = f"{layer.runs}: {layer.why or layer.reason}"
        whys[what] = whys.get(what, 0) + 1
    return "\n".join(f"    {n} quantized layers run {what}" for what, n in whys.items())


def _overhead_model(model):
    """The same family and layer count at hidden size 64: a step of it is framework overhead only."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=512))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _matvec_floor_ms(model, linear, reps: int = 5) -> float:
    """ms to multiply one token by every 2D weight once with ``linear``: the weights-read floor of a step."""
    weights = [p for p in model.parameters() if p.dim() == 2]  # tied embedding/lm_head counted once
    xs = [torch.ones(1, w.shape[1], dtype=w.dtype) for w in weights]
    times = []
    with torch.no_grad():
        for w, x in zip(weights, xs):  # warm-up (and, for dense.linear, its kernel choice per shape)
            linear(x, w)
        for _ in range(reps):
            t0 = CLOCK()
            for w, x in zip(weights, xs):
                linear(x, w)
            times.append(CLOCK() - t0)
    return statistics.median(times) * 1e3


def profile_table(args) -> str:
    """Where a base-model decode step's time goes: weights read vs framework overhead, HF vs slimlm."""
    model, tok = build_variant("base")
    ids = prompt_ids(tok, args.prompt_tokens)
    small = _overhead_model(model)
    small_ids = [i % 500 + 4 for i in ids]
    rows = {}
    for name, m, prompt in (("full step (base, fp32)", model, ids), ("overhead: same layers, hidden 64", small,
                                                                       small_ids)):
        dec = make_decoder(m)
        hf = decode_tps(lambda n: hf_run(m, prompt, n), args.new_tokens, args.runs)[0]
        sl = decode_tps(lambda n: slim_run(dec, prompt, n), args.new_tokens, args.runs)[0]
        rows[name] = (1e3 / hf, 1e3 / sl)
    floor = _matvec_floor_ms(model, torch.nn.functional.linear)
    rows["weights read once (F.linear, MKL, over every weight)"] = (floor, floor)
    floor = _matvec_floor_ms(model, lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    rows["weights read once (oneDNN inner product, every weight)"] = (floor, floor)
    floor = _matvec_floor_ms(model, dense.linear)
    rows["weights read once (dense.linear: slimlm's chosen path, see the choices below)"] = (floor, floor)
    bound = bytes_read_per_token(model) / (MACHINE_GBPS * 1e9) * 1e3
    rows[f"bandwidth bound ({MACHINE_GBPS:.0f} GB/s)"] = (bound, bound)
    head = ("component", "HF generate ms/token", "slimlm ms/token")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines += [" | ".join([k, f"{a:.1f}", f"{b:.1f}"]) for k, (a, b) in rows.items()]
    return "\n".join(lines) + "\n\n" + tune.format_decisions()


def mixed_prompts(tok, n: int, lo: int, hi: int) -> list[list[int]]:
    """n prompts with lengths spread evenly over [lo, hi], cut from different evaluation documents."""
    lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=g).tolist()
    return [prompt_ids(tok, lengths[j], doc=i) for i, j in enumerate(order)]


def batch_table(args) -> str:
    model, tok = build_variant("base")
    dec = make_decoder(model)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = mixed_prompts(tok, max(batches), args.prompt_tokens // 2, args.prompt_tokens)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    head = ("batch", "prefill s", "decode tok/s (all rows)", "ms / step (latency)", "throughput vs batch 1")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    base = None
    for b in batches:
        group = sorted(prompts, key=len)[:b]  # grouped by length: one batch of similar lengths
        generate(dec, group, GenerationConfig(max_new_tokens=2), batch_size=b)  # warm-up
        t0 = time.perf_counter()
        steps = decode_steps(dec, group, cfg)
        next(steps)
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        t2 = time.perf_counter()
        tput = b * n / (t2 - t1)
        base = base or tput
        lines.append(" | ".join([str(b), f"{t1 - t0:.2f}", f"{tput:.1f}", f"{(t2 - t1) / n * 1e3:.1f}",
                                 f"{tput / base:.2f}x"]))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def paged_table(args) -> str:
    model, tok = build_variant("base")
    dec = make_decoder(model)
    per_tok = model_info(model).kv_bytes_per_token
    n_req, max_new, block = args.paged_requests, args.paged_new_tokens, args.block_size
    prompts = mixed_prompts(tok, n_req, 8, args.paged_max_prompt)
    stop = tuple({tok.eos_token_id, *tok("\n").input_ids})
    cfg = GenerationConfig(max_new_tokens=max_new, stop_tokens=stop)
    caches: list[PagedKVCache] = []

    def paged(batch: int, max_len: int) -> PagedKVCache:
        caches.append(PagedKVCache(dec.cache_spec(), batch=batch, max_len=max_len, block_size=block))
        return caches[-1]

    outs = generate(dec, prompts, cfg, batch_size=n_req, cache_fn=paged)
    same = outs == generate(dec, prompts, cfg, batch_size=n_req)
    mib = lambda tokens: tokens * per_tok / 2**20  # noqa: E731
    contiguous = sum(len(p) + max_new for p in prompts)
    rows = [
        ("contiguous, reserved per request (prompt + max new)", contiguous),
        ("static batch, left padded (batch x (longest prompt + max new))", n_req * (max(map(len, prompts)) + max_new)),
        (f"paged, block {block}: peak blocks in use", caches[0].peak_blocks * block),
        ("tokens held at the peak (floor for any allocator)", caches[0].peak_tokens),
    ]
    head = ("allocation", "KV MiB", "vs contiguous")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines += [" | ".join([name, f"{mib(t):.1f}", f"{t / contiguous:.0%}"]) for name, t in rows]
    lines.append(f"\n{n_req} requests, prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
                 f"generated {min(len(o) for o in outs)}..{max(len(o) for o in outs)} of max {max_new} "
                 f"(stop at newline/EOS); {per_tok:,} KV bytes/token; paged outputs == static: {same}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd step (slow to compile)")
    p.add_argument("--kv-dtype", default=None, choices=("float16", "bfloat16"),
                   help="speed table: also time slimlm (and its compiled step) over a KV cache of this dtype, "
                        "interleaved with the float32 cache")
    p.add_argument("--paged-requests", type=int, default=16)
    p.add_argument("--paged-new-tokens", type=int, default=128)
    p.add_argument("--paged-max-prompt", type=int, default=384)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--only", default="speed,profile,batch,paged")
    p.add_argument("--allow-slow", action="store_true",
                   help="time a quantized variant even when a layer fell back to the reference path")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: the speed table times on-CPU time (process_time), for a busy machine at 1 thread")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    sections = {"speed": speed_table, "batch": batch_table, "paged": paged_table, "profile": profile_table}
    for name in args.only.split(","):
        print(f"\n## {name} ({torch.get_num_threads()} threads, prompt {args.prompt_tokens}, "
              f"{args.new_tokens} new tokens, {args.runs} runs, {args.clock} clock)\n", flush=True)
        print(sections[name](args), flush=True)


if __name__ == "__main__":
    main()
