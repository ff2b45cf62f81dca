"""slimlm's decode against llama.cpp's, run by run in turn in one process, so the machine's drift is shared.

    .venv/bin/python benchmarks/engines_alternate.py --work out/engines [--rounds 9] [--compile] [--kv-dtype float16]
        [--instances 3] [--pairs rtn-q8_0-shared:llamacpp-q8_0,gptq-q4_0-head8-shared:llamacpp-q4_0] [--threads 2]

Reads what ``benchmarks/engines.py`` stored in ``--work`` (its settings, checkpoints and GGUF files: run that
first with the rows named here). Each pair ``slimlm-row:llamacpp-row`` gives the contenders

- slimlm's loop (``warmed_loop``: the fast decoder; compiled with ``--compile``) over the slimlm row's
  checkpoint, with a float32 KV cache and, with ``--kv-dtype``, also over one of that dtype (llama.cpp's
  default cache is float16);
- llama.cpp over its own quantization (the llama.cpp row's GGUF);
- llama.cpp over the slimlm row's GGUF (the same weights in the same layout: llama.cpp's own spread).

Every contender is loaded ``--instances`` times (separate loads, all alive at once) and each instance
warmed. Then each of ``--rounds`` rounds times one greedy decode per instance (``--new-tokens`` after the
protocol's prompt, as engines.py times them), in an order shuffled round by round. Why both: single
engines.py runs put minutes between the two engines' timings, and on these shared 2-core virtual machines
an engine's rate on one file moved by up to 45% from process to process within an hour, two files of equal
bytes ran 23% apart side by side in one process, and separately loaded copies of one model up to 9% apart;
rounds seconds apart cancel slow drift, several copies average whatever sets a copy's speed. Printed: each
contender's median, min and max decode tok/s over all runs, its median per instance, and the median over
rounds of slimlm / llama.cpp (own file), each round's rate the mean over the instances, with its range.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slimlm.eval import get_protocol
from slimlm.eval.protocol import for_tokenizer
from slimlm.eval.runner import eval_tokens
from slimlm.eval.speed import warmed_loop
from slimlm.io import load_compressed
from slimlm.models import load_model

from _llamacpp import LlamaCppLoop  # benchmarks/ is on sys.path when a script runs
from engines import speed_prompt

PAIRS = "rtn-q8_0-shared:llamacpp-q8_0,gptq-q4_0-head8-shared:llamacpp-q4_0"


@dataclass
class Contender:
    name: str
    pair: str  # the llama.cpp row it is compared with
    runs: list[Callable[[], float]]  # per loaded instance: one timed greedy decode -> decode tok/s
    reference: bool = False  # llama.cpp over its own file: the ratios' denominator


Rates = dict[str, list[list[float]]]  # contender -> per round, per instance: decode tok/s


def round_order(items: list, k: int) -> list:
    """Round ``k``'s order of ``items``: as given in round 0, then a fixed pseudo-random shuffle per round, so
    no contender always runs first or always right after the same other one (what ran just before a run can
    slow it: caches, the other engine's threads going to sleep)."""
    if k == 0:
        return list(items)
    out = list(items)
    random.Random(k).shuffle(out)
    return out


def per_round_ratios(rates: Rates, contenders: list[Contender]) -> dict[str, list[float]]:
    """For every contender that is not a reference: its rate / its pair's reference rate, round by round (each
    the mean over the contender's instances in that round)."""
    refs = {c.pair: c.name for c in contenders if c.reference}
    mean = statistics.fmean
    return {c.name: [mean(a) / mean(b) for a, b in zip(rates[c.name], rates[refs[c.pair]])]
            for c in contenders if not c.reference and c.pair in refs}  # fmt: skip


def table(rates: Rates, contenders: list[Contender], *, threads: int, new_tokens: int, prompt_tokens: int) -> str:
    ratios = per_round_ratios(rates, contenders)
    some = next(iter(rates.values()))
    head = ("contender", "median tok/s", "min", "max", "median per instance",
            "/ llama.cpp own file: median of rounds", "range")  # fmt: skip
    lines = [f"decode tok/s, {threads} threads, {new_tokens} tokens after a {prompt_tokens}-token prompt, "
             f"{len(some)} rounds x {len(some[0])} instances, in turn", " | ".join(head),
             " | ".join("---" for _ in head)]  # fmt: skip
    for c in contenders:
        r, q = [x for rnd in rates[c.name] for x in rnd], ratios.get(c.name)
        per = " / ".join(f"{statistics.median(col):.1f}" for col in zip(*rates[c.name]))
        cells = [c.name, f"{statistics.median(r):.1f}", f"{min(r):.1f}", f"{max(r):.1f}", per]
        cells += [f"{statistics.median(q):.2f}x", f"{min(q):.2f}-{max(q):.2f}x"] if q else ["(reference)", ""]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _slimlm_contenders(row: str, pair: str, args: argparse.Namespace, prompt: torch.Tensor) -> list[Contender]:
    """slimlm's loop over the row's checkpoint, each instance a fresh load (and compile)."""
    kvs = (None, args.kv_dtype) if args.kv_dtype else (None,)
    names, runs = [""] * len(kvs), [[] for _ in kvs]
    for _ in range(args.instances):
        model, _ = load_compressed(Path(args.work) / "ckpt" / row)
        for k, kv in enumerate(kvs):
            loop = warmed_loop(model, prompt, compile=args.compile, kv_dtype=kv)

            def run(loop=loop) -> float:
                _, steps = loop.run(prompt, args.new_tokens)
                return len(steps) / sum(steps)

            names[k] = f"slimlm {row} ({loop.name})"
            runs[k].append(run)
    return [Contender(name, pair, r) for name, r in zip(names, runs)]


def _llamacpp_contender(name: str, gguf: str, pair: str, args: argparse.Namespace, prompt: list[int],
                        reference: bool) -> Contender:  # fmt: skip
    runs = []
    for _ in range(args.instances):
        loop = LlamaCppLoop(Path(gguf), n_ctx=len(prompt) + args.new_tokens, threads=args.threads)
        loop.warm_up(prompt)
        runs.append(lambda loop=loop: loop.run(prompt, args.new_tokens)[1])
    return Contender(name, pair, runs, reference)


def contenders(args: argparse.Namespace, store: dict, prompt: torch.Tensor) -> list[Contender]:
    out = []
    for spec in args.pairs.split(","):
        row, _, ref = spec.partition(":")
        missing = [r for r in (row, ref) if r not in store["rows"]]
        if missing:
            raise SystemExit(f"{args.work}/rows.json has no row {', '.join(missing)}: run benchmarks/engines.py "
                             f"--rows {row},{ref} --work {args.work} first")  # fmt: skip
        out.append(_llamacpp_contender(f"llama.cpp {ref} (its own file)", store["rows"][ref]["gguf"], ref, args,
                                       prompt.tolist(), True))  # fmt: skip
        out.append(_llamacpp_contender(f"llama.cpp {row}.gguf", store["rows"][row]["gguf"], ref, args,
                                       prompt.tolist(), False))  # fmt: skip
        out += _slimlm_contenders(row, ref, args, prompt)
    return out


def alternate(cs: list[Contender], rounds: int) -> Rates:
    """``rounds`` timed runs of every instance of every contender, in turn, the order shuffled each round."""
    rates: Rates = {c.name: [] for c in cs}
    slots = [(c.name, i, run) for c in cs for i, run in enumerate(c.runs)]
    for k in range(rounds):
        for c in cs:
            rates[c.name].append([0.0] * len(c.runs))
        for name, i, run in round_order(slots, k):
            gc.collect()
            rates[name][k][i] = run()
        logging.info("round %d: %s", k + 1, ", ".join(f"{n} {statistics.fmean(r[-1]):.1f}" for n, r in rates.items()))
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/engines", help="engines.py's --work (its rows.json, checkpoints, GGUFs)")
    p.add_argument("--pairs", default=PAIRS, help=f"comma list of slimlm-row:llamacpp-row (default {PAIRS})")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--instances", type=int, default=3,
                   help="separate loads of every contender (one copy's speed can differ from another's)")
    p.add_argument("--threads", type=int, default=None, help="threads in both engines (default: the stored rows')")
    p.add_argument("--new-tokens", type=int, default=None, help="decode length (default: the stored rows')")
    p.add_argument("--compile", action="store_true", help="time slimlm's compiled decode step")
    p.add_argument("--kv-dtype", default=None, choices=("float16", "bfloat16"),
                   help="also time slimlm over a KV cache of this dtype")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = Path(args.work) / "rows.json"
    if not path.is_file():
        raise SystemExit(f"no {path}: run benchmarks/engines.py --work {args.work} first")
    store = json.loads(path.read_text())
    settings = store["settings"]
    args.threads = args.threads or settings["threads"]
    args.new_tokens = args.new_tokens or settings["new_tokens"]
    torch.set_num_threads(args.threads)
    _, tok = load_model(settings["model"])
    proto = for_tokenizer(get_protocol(settings["protocol"]), tok)
    prompt = speed_prompt(eval_tokens(tok, proto), proto)
    cs = contenders(args, store, prompt)
    rates = alternate(cs, args.rounds)
    print(table(rates, cs, threads=args.threads, new_tokens=args.new_tokens, prompt_tokens=len(prompt)))


if __name__ == "__main__":
    main()
