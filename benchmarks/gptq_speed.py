"""Where GPTQ's time goes, on a random model shaped like the built-in one (no download).

    .venv/bin/python benchmarks/gptq_speed.py [--samples 16] [--seq-len 512] [--layers 4] [--threads 2]
                                              [--scale-samples 128] [--json out.json]

Builds a LlamaConfig model with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9/3 heads,
vocab 49152, tied embeddings; ``--layers`` of its 30 blocks), runs ``apply_gptq`` with the
``gptq-int4-g64`` recipe's config (act-order, static groups) on random token ids, and times each
part by wrapping the library functions that do it: the capture of block 0's inputs, the first
(statistics) pass of each block with its Hessian accumulation split out, the GPTQ solves (set-up,
grid, column loop), packing into QuantLinear, and the re-run that makes the next block's inputs.
The projection to the real run scales the per-token parts by ``--scale-samples / --samples`` and
everything per block by ``30 / --layers``. Seconds on a shared machine are noisy; the fractions are
the point. Run it against another checkout by putting that checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimlm.calib.runner as runner
import slimlm.calib.stats as stats_mod
import slimlm.quant.gptq as gptq_mod
import slimlm.quant.gptq_handler as handler
from slimlm.quant import GPTQ, apply_gptq

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=100000.0)  # fmt: skip
PER_TOKEN = ("capture", "pass1 forward", "hessian", "rerun forward", "one-pass forward")  # scale with the calibration tokens

T: dict[str, float] = defaultdict(float)
CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU seconds, all threads)


@contextmanager
def timed(key: str):
    t0 = CLOCK()
    try:
        yield
    finally:
        T[key] += CLOCK() - t0


def wrap(mod, name: str, key: str) -> None:
    fn = getattr(mod, name)

    def wrapped(*a, **k):
        with timed(key):
            return fn(*a, **k)

    setattr(mod, name, wrapped)


def instrument() -> None:
    wrap(runner, "capture_block_inputs", "capture")
    wrap(stats_mod, "add_gram", "hessian")
    wrap(gptq_mod, "prepare", "solve: prepare (perm, Cholesky)")
    wrap(gptq_mod, "column_grid", "solve: grid params")
    wrap(gptq_mod, "grid_solve" if hasattr(gptq_mod, "grid_solve") else "obs_solve", "solve: column loop")
    wrap(handler, "gptq_quantize", "solve total")
    wrap(handler, "replace_module", "swap")
    fl = handler.QuantLinear.from_linear
    handler.QuantLinear.from_linear = staticmethod(lambda *a, **k: _timed_call("pack", fl, *a, **k))
    collect = runner._collect
    runner._collect = lambda *a, **k: _timed_call("pass1 total", collect, *a, **k)
    cb = runner.calibrate_blocks

    def calibrate_blocks(model, calib, *, on_block, **kw):
        def timed_on_block(ctx):
            with timed("on_block"):
                return on_block(ctx)

        return cb(model, calib, on_block=timed_on_block, **kw)

    runner.calibrate_blocks = calibrate_blocks


def _timed_call(key, fn, *a, **k):
    with timed(key):
        return fn(*a, **k)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SMOLLM2)).eval()
    return model


def table(total: float, scale_tok: float, scale_blocks: float) -> dict[str, float]:
    t = dict(T)
    t["solve: other"] = t["solve total"] - sum(v for k, v in t.items() if k.startswith("solve: "))
    walk = total - t["capture"]
    if "pass1 total" not in t:  # the one-pass walk (GPTQ's default): one forward per block, solves inside it
        rewrite = t.pop("solve total") + t.get("pack", 0) + t.get("swap", 0)
        t.pop("on_block", None)
        t["one-pass forward"] = walk - t.get("hessian", 0.0) - rewrite
        proj = {k: v * (scale_tok if k in PER_TOKEN else 1.0) * scale_blocks for k, v in t.items()}
        return {"measured": t, "projected": proj}
    t["pass1 forward"] = t.pop("pass1 total") - t.get("hessian", 0.0)
    on_block = t.pop("on_block")
    t["handler other"] = on_block - t["solve total"] - t.get("pack", 0) - t.get("swap", 0)
    t.pop("solve total")
    t["rerun forward"] = walk - t["pass1 forward"] - t["hessian"] - on_block
    proj = {k: v * (scale_tok if k in PER_TOKEN else 1.0) * scale_blocks for k, v in t.items()}
    if hasattr(runner, "_walk_block"):  # this checkout re-runs every block but the last
        layers = round(30 / scale_blocks)
        proj["rerun forward"] = t["rerun forward"] * scale_tok * 29 / max(layers - 1, 1)
    return {"measured": t, "projected": proj}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale-samples", type=int, default=128)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: CPU seconds of this process (steadier on a shared machine; with 1 thread)")
    p.add_argument("--calib-dtype", default=None, help="GPTQ(calib_dtype=...), e.g. bfloat16 (default: the config's)")
    p.add_argument("--json", default=None)
    p.add_argument("--codes", default=None, help="save every layer's codes/scales here (torch.save)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rss_start = _rss_mb()  # torch, transformers and slimlm imported, no model yet
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    instrument()
    model = build(args.layers)
    rss_model = _rss_mb()
    calib = torch.randint(0, SMOLLM2["vocab_size"], (args.samples, args.seq_len),
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    t0, w0 = CLOCK(), time.perf_counter()
    extra = {"calib_dtype": args.calib_dtype} if args.calib_dtype else {}  # absent in older checkouts
    apply_gptq(model, GPTQ(scheme="int4-g64", act_order=True, **extra), calib)
    total, wall = CLOCK() - t0, time.perf_counter() - w0
    res = table(total, args.scale_samples / args.samples, 30 / args.layers)
    res.update(total=total, wall=wall, projected_total=sum(res["projected"].values()),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_start_mb=rss_start,
               rss_model_built_mb=rss_model,
               float_model_mb=sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6,
               args=vars(args))  # fmt: skip
    print(f"total {total:.1f} s measured ({args.clock}; wall {wall:.1f} s); projected {res['projected_total']:.0f} s for {args.scale_samples} x "
          f"{args.seq_len}, 30 blocks; RSS: {rss_start:.0f} MB after imports, {rss_model:.0f} MB with the model "
          f"({res['float_model_mb']:.0f} MB of tensors), peak {res['peak_rss_mb']:.0f} MB")
    for k, v in sorted(res["projected"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:34s} {res['measured'][k]:8.2f} s  -> {v:7.1f} s  {100 * v / res['projected_total']:5.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.codes:
        torch.save({n: m.portable_tensors() for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"},
                   args.codes)


if __name__ == "__main__":
    main()
