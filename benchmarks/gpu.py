"""GPU numbers on a lent CUDA machine (``scripts/gpu-check.sh`` runs it after the CUDA tests).

    python3 benchmarks/gpu.py --out DIR [--sections bandwidth,gemv,sparse24,ct,decode] [--deadline 300]

Sections (each one's table is appended to ``DIR/gpu.md`` as soon as it is done; a section that fails
writes its error and the next one runs; no section starts after ``--deadline`` seconds):

- bandwidth: the device's copy and read rates on 2 GiB (the ceiling the other tables are read against).
- gemv: one row through a SmolLM2-135M-shaped (and a 4096-wide) linear, bfloat16 dense vs slimlm's int8
  per-channel and int4-g64 QuantLinear on their CUDA kernels; time per call inside a CUDA graph (kernel
  time, no launch overhead) and weight GB/s.
- sparse24: 2:4 SparseLinear on sparse tensor cores vs the dense bfloat16 linear, rows 1..4096.
- int8c: int8 per-channel GEMV as an inductor-fused dequantize-and-multiply vs torch's int8 kernel.
- graphs: slimlm's loop with CUDA-graph steps (GraphStep) vs eager, every variant, 256 new tokens.
- ct: a compressed-tensors W4A16 export (symmetric int4 groups) of a tiny Llama loaded by stock
  transformers on the GPU (compressed modules, default path) against slimlm's own model on the GPU.
- decode: a SmolLM2-135M-shaped Llama with random weights (the real weights do not fit the 64 MiB a
  device call carries; speed depends on shapes, not values), bfloat16, batch 1: HF generate vs slimlm's
  loop (eager, and the step under torch.compile) for base / int8 / int4-g64 / int4-g64 with an int8
  head; tok/s, weight GB/s against the measured read rate, and whether the greedy tokens equal HF's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CUDA = torch.device("cuda")
BF16 = torch.bfloat16
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def sync() -> None:
    if CUDA.type == "cuda":
        torch.cuda.synchronize()


def events_ms(fn, iters: int = 50, warmup: int = 5) -> float:
    """Median ms of ``fn()`` over ``iters`` CUDA-event-timed calls (wall clock on the CPU dry run)."""
    for _ in range(warmup):
        fn()
    times = []
    if CUDA.type == "cpu":
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, reps: int = 20) -> tuple[float, str]:
    """ms per ``fn()`` replayed from a CUDA graph of ``reps`` calls (kernel time); eager events if capture fails."""
    try:
        if CUDA.type == "cpu":
            raise RuntimeError("no CUDA graphs on the CPU dry run")
        fn()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        return events_ms(g.replay, iters=20) / reps, "graph"
    except Exception as e:  # noqa: BLE001 -- an op that cannot be captured: time it eagerly
        return events_ms(fn), f"eager ({type(e).__name__})"


# -- sections ---------------------------------------------------------------------------------------
def bandwidth() -> tuple[str, float]:
    n = 2 * 2**30 if CUDA.type == "cuda" else 2**26
    x = torch.empty(n, dtype=torch.uint8, device=CUDA).fill_(1)
    y = torch.empty_like(x)
    copy = events_ms(lambda: y.copy_(x), iters=10)
    xf = x.view(torch.float32)
    read = events_ms(lambda: xf.sum(), iters=10)
    read_gbps = n / read / 1e6
    text = (f"| what | ms | GB/s |\n|---|---|---|\n| copy 2 GiB (read + write) | {copy:.2f} | {2 * n / copy / 1e6:.0f} |\n"
            f"| read 2 GiB (sum) | {read:.2f} | {read_gbps:.0f} |\n")
    return text, read_gbps


def gemv(read_gbps: float) -> str:
    from slimlm.formats import parse_scheme
    from slimlm.models.size import weight_storage
    from slimlm.nn import QuantLinear

    rows = ["| out x in | format | kernel | us per call | weight MB | GB/s | % of read rate | timed |",
            "|---|---|---|---|---|---|---|---|"]
    for out_f, in_f in [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (14336, 4096)]:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False, device=CUDA, dtype=BF16)
        x = torch.randn(1, in_f, device=CUDA, dtype=BF16)
        mods = {"bf16 dense": (lin, "F.linear")}
        for scheme in ("int8-channel-sym", "int4-g64"):
            q = QuantLinear.from_linear(lin, parse_scheme(scheme))
            mods[scheme] = (q, q.kernel.name)
        with torch.no_grad():
            for fmt, (m, kname) in mods.items():
                ms, how = graph_ms(lambda m=m: m(x))
                mb = weight_storage(m)[1] / 1e6
                gbps = mb / ms
                rows.append(f"| {out_f}x{in_f} | {fmt} | {kname} | {ms * 1e3:.1f} | {mb:.2f} | {gbps:.0f} | "
                            f"{gbps / read_gbps:.0%} | {how} |")
    return "\n".join(rows) + "\n"


def int8_compiled(read_gbps: float) -> str:
    """int8 per-channel weights through inductor: ``F.linear(x, q.to(bf16)) * s`` fused into one generated
    kernel at one row, against torch's ``_weight_int8pack_mm`` (the int8_weight_only kernel)."""
    from slimlm.formats import parse_scheme
    from slimlm.nn import QuantLinear

    fused = torch.compile(lambda x, q, s: F.linear(x, q.to(x.dtype)) * s)
    rows = ["| out x in | int8_weight_only us | compiled dequant-matmul us | GB/s (compiled) | % of read rate | "
            "max abs diff |", "|---|---|---|---|---|---|"]
    for out_f, in_f in [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (14336, 4096)]:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False, device=CUDA, dtype=BF16)
        x = torch.randn(1, in_f, device=CUDA, dtype=BF16)
        q_lin = QuantLinear.from_linear(lin, parse_scheme("int8-channel-sym"))
        w = q_lin.dequantized_weight().float()
        scale = w.abs().amax(1, keepdim=True) / 127
        q = torch.round(w / scale).to(torch.int8)
        s_row = scale.t().to(BF16)  # (1, out)
        with torch.no_grad():
            diff = (fused(x, q, s_row).float() - q_lin(x).float()).abs().max().item()
            a, _ = graph_ms(lambda: q_lin(x))
            b, _ = graph_ms(lambda: fused(x, q, s_row))
        gbps = (out_f * in_f + out_f * 2) / b / 1e6
        rows.append(f"| {out_f}x{in_f} | {a * 1e3:.1f} | {b * 1e3:.1f} | {gbps:.0f} | {gbps / read_gbps:.0%} | {diff:.3g} |")
    return "\n".join(rows) + "\n"


def graphs(read_gbps: float, variants: list[str]) -> str:
    """slimlm's loop with each one-token step replayed from a CUDA graph (slimlm.generation.graphs)."""
    from slimlm.generation import GenerationConfig, make_decoder
    from slimlm.generation.graphs import GraphStep
    from slimlm.generation.loop import decode_steps
    from slimlm.models.size import bytes_read_per_token

    rows = ["| variant | MB read/token | eager tok/s | CUDA graph tok/s | graph / eager | GB/s | % of read rate | "
            "same tokens as eager |", "|---|---|---|---|---|---|---|---|"]
    prompt = torch.randint(10, 40000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    n_new = 256 if CUDA.type == "cuda" else 6
    for v in variants:
        model = smol_shaped(v)
        dec = make_decoder(model)
        step = GraphStep(dec)

        def run(n, st=None):
            cfg = GenerationConfig(max_new_tokens=n)
            return [int(t[0]) for t in decode_steps(dec, [prompt], cfg, step=st, cache_fn=step.new_cache)]

        rates, toks = {}, {}
        for name, st in (("eager", None), ("graph", step)):
            run(3, st)
            best = []
            for _ in range(3):
                toks[name], tn = _timed(lambda n: run(n, st), n_new)
                t1 = _timed(lambda n: run(n, st), 1)[1]
                best.append((n_new - 1) / max(tn - t1, 1e-9))
            rates[name] = statistics.median(best)
        mb = bytes_read_per_token(model) / 1e6
        gb = mb * rates["graph"] / 1e3
        failed = f" (FAILED: {step.failed})" if step.failed else ""
        rows.append(f"| {v} | {mb:.0f} | {rates['eager']:.0f} | {rates['graph']:.0f}{failed} | "
                    f"{rates['graph'] / rates['eager']:.1f}x | {gb:.0f} | {gb / read_gbps:.1%} | "
                    f"{'yes' if toks['graph'] == toks['eager'] else _first_diff(toks['graph'], toks['eager'])} |")
        print(rows[-1], flush=True)
        model = dec = step = None
    return "\n".join(rows) + "\n"


def sparse24() -> str:
    from slimlm.nn import SparseLinear
    from slimlm.prune import nm_keep

    rows = ["| out x in | rows | dense bf16 us | 2:4 us | speed-up | kernel | max abs diff |", "|---|---|---|---|---|---|---|"]
    for out_f, in_f in [(4096, 4096), (14336, 4096), (4096, 14336)][: 3 if CUDA.type == "cuda" else 1]:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False, device=CUDA, dtype=BF16)
        keep = nm_keep(lin.weight, 2, 4)
        with torch.no_grad():
            lin.weight.mul_(keep)
        sp = SparseLinear.from_linear(lin, keep, nm=(2, 4), kernel="sparse-2:4-cuda" if CUDA.type == "cuda" else None)
        for m in (1, 16, 256, 4096) if CUDA.type == "cuda" else (1, 16):
            x = torch.randn(m, in_f, device=CUDA, dtype=BF16)
            with torch.no_grad():
                diff = (sp(x).float() - lin(x).float()).abs().max().item()
                d = events_ms(lambda: lin(x))
                s = events_ms(lambda: sp(x))
            rows.append(f"| {out_f}x{in_f} | {m} | {d * 1e3:.1f} | {s * 1e3:.1f} | {d / s:.2f}x | {sp.kernel.name} | {diff:.3g} |")
    return "\n".join(rows) + "\n"


def ct_load(tmp: Path) -> str:
    from transformers import AutoModelForCausalLM

    from slimlm.api import apply
    from slimlm.export.compressed_tensors import export_compressed_tensors
    from slimlm.io import save_compressed
    from slimlm.models.tiny import tiny_model, tiny_tokenizer
    from slimlm.quant import RTN
    from slimlm.formats import parse_scheme

    model = tiny_model("llama")
    apply(model, RTN(scheme=parse_scheme("int4-g16-sym")))
    ck = save_compressed(model, tiny_tokenizer(), tmp / "ckpt")
    out = export_compressed_tensors(ck, tmp / "ct")
    hf = AutoModelForCausalLM.from_pretrained(out, device_map=CUDA.type).eval()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1)).to(CUDA)
    model = model.to(CUDA).eval()
    with torch.no_grad():
        a, b = hf(ids).logits.float(), model(ids).logits.float()
    kinds = sorted({type(m).__name__ for m in hf.modules() if "Linear" in type(m).__name__})
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return (f"tiny Llama, RTN int4-g16-sym, exported as compressed-tensors (pack-quantized W4A16), loaded by "
            f"transformers on {CUDA} (linear modules: {', '.join(kinds)}): max |logit diff| "
            f"vs slimlm's model on the GPU {(a - b).abs().max().item():.3g} (logit scale {b.abs().max().item():.3g}), "
            f"top-1 agreement {agree:.1%}\n")


def smol_shaped(variant: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimlm.api import apply
    from slimlm.formats import parse_scheme
    from slimlm.quant import RTN
    from slimlm.recipe import load_recipe

    torch.manual_seed(0)
    shape = SMOL if CUDA.type == "cuda" else {**SMOL, "num_hidden_layers": 2}
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(CUDA, BF16).eval()
    if variant == "int8":
        apply(model, RTN(scheme=parse_scheme("int8-channel-sym")))
    elif variant in ("int4", "int4-head8"):
        for cfg in load_recipe({"int4": "rtn-int4-g64", "int4-head8": "rtn-int4-g64-head8"}[variant]).steps:
            apply(model, cfg)
    return model


def _timed(run, n: int) -> tuple[list[int], float]:
    sync()
    t0 = time.perf_counter()
    toks = run(n)
    sync()
    return toks, time.perf_counter() - t0


def decode(read_gbps: float, variants: list[str], compile_variants: set[str], deadline: float) -> str:
    from slimlm.generation import GenerationConfig, make_decoder
    from slimlm.generation.compiled import compile_step
    from slimlm.generation.loop import decode_steps
    from slimlm.eval.speed import measure_speed
    from slimlm.kernels import kernel_report
    from slimlm.models.size import bytes_read_per_token

    n_new, prompt = 64 if CUDA.type == "cuda" else 6, torch.randint(10, 40000, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()[0]
    rows = ["| variant | MB read/token | HF tok/s | slimlm eager tok/s | compiled tok/s | compile s | "
            "best GB/s | % of read rate | same tokens as HF | eval speed: prefill / decode tok/s | kernels |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        if time.time() > deadline:
            rows.append(f"| {v} | skipped: deadline |")
            continue
        model = smol_shaped(v)
        x = torch.tensor([prompt], device=CUDA)

        def hf(n):
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[0, len(prompt):].tolist()

        dec = make_decoder(model)
        engines = {"hf": hf, "eager": lambda n: [int(t[0]) for t in decode_steps(dec, [prompt], GenerationConfig(max_new_tokens=n))]}
        compile_s = None
        if v in compile_variants:
            step = compile_step(dec)
            t0 = time.perf_counter()
            engines["eager"](1)
            [int(t[0]) for t in decode_steps(dec, [prompt], GenerationConfig(max_new_tokens=4), step=step)]
            compile_s = time.perf_counter() - t0
            engines["compiled"] = lambda n: [int(t[0]) for t in decode_steps(dec, [prompt], GenerationConfig(max_new_tokens=n), step=step)]
        for run in engines.values():
            run(2)
        rates, toks = {k: [] for k in engines}, {}
        for _ in range(3):
            for k, run in engines.items():
                toks[k], tn = _timed(run, n_new)
                _, t1 = _timed(run, 1)
                rates[k].append((n_new - 1) / max(tn - t1, 1e-9))
        med = {k: statistics.median(r) for k, r in rates.items()}
        sp = measure_speed(model, torch.tensor(prompt, device=CUDA), new_tokens=32, runs=2)  # the eval's CUDA timing
        mb = bytes_read_per_token(model) / 1e6
        best = max(med.get("compiled", 0), med["eager"])
        same = ", ".join(f"{k} {'yes' if toks[k] == toks['hf'] else _first_diff(toks[k], toks['hf'])}"
                         for k in engines if k != "hf")
        kernels = sorted({layer.runs for layer in kernel_report(model).layers}) if v != "base" else ["bf16 dense"]
        comp = f"{med['compiled']:.0f}" + (f" (FAILED: {step.failed})" if step.failed else "") if "compiled" in med else "-"
        rows.append(f"| {v} | {mb:.0f} | {med['hf']:.0f} | {med['eager']:.0f} | {comp} | "
                    f"{'-' if compile_s is None else f'{compile_s:.0f}'} | {mb * best / 1e3:.1f} | "
                    f"{mb * best / 1e3 / read_gbps:.1%} | {same} | {sp.prefill_tokens_per_s:.0f} / "
                    f"{sp.decode_tokens_per_s:.0f} | {', '.join(kernels)} |")
        print(rows[-1], flush=True)
        model = dec = engines = None
        if CUDA.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(rows) + "\n"


def _first_diff(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"NO (from token {i})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", default="bandwidth,gemv,int8c,sparse24,ct,graphs,decode")
    p.add_argument("--variants", default="int4-head8,base,int8,int4")
    p.add_argument("--compile-variants", default="int4-head8,base")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds after which no section or variant starts")
    p.add_argument("--dry-run-cpu", action="store_true", help="run every section on the CPU, small, to check the script")
    args = p.parse_args(argv)
    global CUDA
    if args.dry_run_cpu:
        CUDA = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this benchmark runs on a GPU machine (scripts/gpu-check.sh)")
    deadline = time.time() + args.deadline
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "gpu.md"
    if CUDA.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        what = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
    else:
        what = "CPU dry run"
    report.write_text(f"# GPU run: {what}, torch {torch.__version__}, CUDA {torch.version.cuda}\n\n")
    read_gbps = 4000.0
    sections = args.sections.split(",")
    for name in sections:
        if time.time() > deadline:
            text = "skipped: deadline\n"
        else:
            t0 = time.perf_counter()
            try:
                if name == "bandwidth":
                    text, read_gbps = bandwidth()
                elif name == "gemv":
                    text = gemv(read_gbps)
                elif name == "int8c":
                    text = int8_compiled(read_gbps)
                elif name == "graphs":
                    text = graphs(read_gbps, args.variants.split(","))
                elif name == "sparse24":
                    text = sparse24()
                elif name == "ct":
                    text = ct_load(Path(tempfile.mkdtemp(prefix="slimlm-ct-")))
                elif name == "decode":
                    text = decode(read_gbps, args.variants.split(","), set(args.compile_variants.split(",")), deadline)
                else:
                    text = f"unknown section {name}\n"
            except Exception:  # noqa: BLE001 -- one section's failure is reported, the next one runs
                text = "FAILED:\n```\n" + traceback.format_exc()[-3000:] + "```\n"
            text += f"\n({time.perf_counter() - t0:.0f} s)\n"
        with report.open("a") as f:
            f.write(f"## {name}\n\n{text}\n")
        print(f"## {name}\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
