"""Speculative decoding on the built-in model: speedup and acceptance per draft kind and task.

    .venv/bin/python benchmarks/speculative.py [--drafts lookup,layers:8,int8,int4,bf16] \
        [--tasks copy,summary,open] [--prompts 2] [--new-tokens 128] [--passage-tokens 256] \
        [--k 4] [--k-max 8] [--fixed-k] [--repeats 1] [--threads 1] [--json out.json] [--allow-slow]

Drafts are ``--draft`` shorthands (slimlm.pipelines.drafts.make_draft): also e.g.
recipe:structured-depth-25 (a structurally pruned copy, ~2 minutes to calibrate) or a model path.
An int8 or int4 draft with a layer off its fast kernel stops the run (exit 1, naming the layer and the
reason); --allow-slow times it anyway.

Tasks, all on passages of the protocol's evaluation text (slimlm.data protocol_texts("wiki-v1")):
- copy (input-grounded): the passage, a blank line, then the passage's first sentence again; the
  model continues re-reading the passage.
- summary (input-grounded): the chat template asking to summarise the passage.
- open: the first sentence of an article, continued freely.

Every draft's output is checked against plain greedy decoding (asserted: speculative greedy must
not change a token). Plain decoding runs through the same loop with no draft (one token per
target forward), so the speedup is the draft's alone. Adaptive k (the default) optimises the
round costs measured once per draft and task (``measure_costs``); "rounds drafted" is the share
of rounds in which it chose to draft at all (k = 0 is a plain step).

Columns: acceptance = accepted / drafted tokens; tokens/target call = new tokens / target
forwards; decode tok/s = new tokens / decode wall time (prefill excluded); speedup (wall) is that
against plain; speedup (CPU) is plain's process time over the draft's for the whole generation
(prefill included), which other jobs on a shared machine disturb less. Runs of all drafts are
interleaved and, with --repeats, the fastest of each counts. Compare ratios within one run, and
re-run on a quiet machine for the record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from slimlm.data import protocol_texts
from slimlm.fsutil import atomic_write_text
from slimlm.generation.decoder import make_decoder
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.generation.speculative import DecoderRunner, SpecConfig, SpecStats, measure_costs, speculative_generate
from slimlm.models import load_model
from slimlm.pipelines.drafts import QUANT_ALIASES, make_draft
from _fast import expect_fast  # benchmarks/ is on sys.path when a script runs

MODEL = "smollm2-135m"
log = logging.getLogger("bench")
TASKS = ("copy", "summary", "open")


def passages(tokenizer, n: int, n_tokens: int) -> list[str]:
    """The first ~n_tokens tokens (cut at a sentence end) of the first n long evaluation articles."""
    out = []
    for doc in protocol_texts("wiki-v1").evaluation:
        ids = tokenizer(doc).input_ids
        if len(ids) < 2 * n_tokens:
            continue
        text = tokenizer.decode(ids[:n_tokens])
        out.append(text[: text.rfind(".") + 1] or text)
        if len(out) == n:
            break
    return out


def prompt_ids(task: str, passage: str, tokenizer) -> list[int]:
    first = passage[: passage.find(".") + 1]
    if task == "copy":
        return tokenizer(passage + "\n\n" + first).input_ids
    if task == "summary":
        msg = [{"role": "user", "content": f"Summarize the following text.\n\n{passage}"}]
        return tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False)
    if task == "open":
        return tokenizer(first).input_ids
    raise SystemExit(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def run(model, draft, prompt: list[int], config: SpecConfig, new_tokens: int) -> tuple[list[int], SpecStats, float]:
    """One greedy generation; also its process (CPU) time, less disturbed by other jobs than wall time."""
    runner = DecoderRunner(model, max_len=len(prompt) + new_tokens + config.k_max + 1)
    cpu = time.process_time()
    ids, stats = speculative_generate(runner, draft, torch.tensor(prompt), max_new_tokens=new_tokens, config=config)
    return ids.tolist(), stats, time.process_time() - cpu


def measure(model, tokenizer, args) -> list[dict]:
    names = ["plain", *[d for d in args.drafts.split(",") if d]]
    drafts = {name: None if name == "plain" else make_draft(name, model, tokenizer) for name in names}
    texts = passages(tokenizer, args.prompts, args.passage_tokens)
    base = SpecConfig(k=args.k, adaptive=not args.fixed_k, k_max=max(args.k, args.k_max))
    rows = []
    for task in args.tasks.split(","):
        prompts = [prompt_ids(task, p, tokenizer) for p in texts]
        configs = {name: _config(model, d, prompts[0], base) for name, d in drafts.items()}
        for name, d in drafts.items():
            run(model, d, prompts[0][:64], configs[name], 8)  # warm-up
            if name in QUANT_ALIASES:  # a quantized draft timed on the reference path would mislead
                expect_fast(d.runner.decoder.model, f"draft {name}", allow_slow=args.allow_slow)
        agg = {name: dict(stats=SpecStats(), wall=0.0, cpu=0.0, identical=True) for name in names}
        for prompt in prompts:
            best: dict[str, tuple[float, float]] = {}
            reference = None
            for rep in range(args.repeats):  # interleaved, so slow spells of a shared machine hit every draft
                for name, d in drafts.items():
                    out, st, cpu = run(model, d, prompt, configs[name], args.new_tokens)
                    if rep == 0:
                        reference = out if reference is None else reference  # plain runs first
                        _add(agg[name], st, identical=out == reference)
                    wall, cpu0 = best.get(name, (float("inf"), float("inf")))
                    best[name] = (min(wall, st.decode_seconds), min(cpu0, cpu))
            for name, (wall, cpu) in best.items():
                agg[name]["wall"] += wall
                agg[name]["cpu"] += cpu
        rows += [_row(task, name, **agg[name]) for name in names]
        log.info("%s", rows[-len(names):])
    return rows


def loop_reference(model, prompt: list[int], new_tokens: int) -> tuple[float, float, bool]:
    """Whole-generation seconds of slimlm's decode loop (loop.generate) and of this loop without a
    draft (fastest of two, interleaved), and whether their greedy outputs agree."""
    decoder, cfg = make_decoder(model), GenerationConfig(max_new_tokens=new_tokens)
    best_loop = best_plain = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        theirs = generate(decoder, [prompt], cfg)[0]
        best_loop = min(best_loop, time.perf_counter() - t0)
        ours, st, _ = run(model, None, prompt, SpecConfig(), new_tokens)
        best_plain = min(best_plain, st.seconds)
    return best_loop, best_plain, theirs == ours


def _config(model, draft, prompt: list[int], base: SpecConfig) -> SpecConfig:
    """Adaptive k optimises the round costs measured once per draft and task."""
    if draft is None or not base.adaptive:
        return base
    costs = measure_costs(DecoderRunner(model, max_len=len(prompt) + base.k_max + 2), draft, torch.tensor(prompt),
                          k_max=base.k_max)  # fmt: skip
    return dataclasses.replace(base, costs=costs)


def _add(agg: dict, st: SpecStats, *, identical: bool) -> None:
    total = agg["stats"]
    for key in ("new_tokens", "target_calls", "proposed", "accepted"):
        setattr(total, key, getattr(total, key) + getattr(st, key))
    total.ks += st.ks
    agg["identical"] &= identical


def _row(task: str, name: str, *, stats: SpecStats, wall: float, cpu: float, identical: bool) -> dict:
    drafted = [k for k in stats.ks if k]
    return dict(task=task, draft=name, acceptance=stats.acceptance_rate, tokens_per_call=stats.tokens_per_call,
                mean_k=statistics.mean(drafted) if drafted else 0.0, drafted_rounds=len(drafted) / len(stats.ks),
                tokens=stats.new_tokens, tokens_per_s=stats.new_tokens / wall, cpu_seconds=cpu,
                identical=identical)  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ("task", "draft", "acceptance", "tokens/target call", "rounds drafted", "mean k", "decode tok/s",
            "speedup (wall)", "speedup (CPU)", "output")  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    plain = {r["task"]: r for r in rows if r["draft"] == "plain"}
    for r in rows:
        spec, p = r["draft"] != "plain", plain[r["task"]]
        lines.append(" | ".join([
            r["task"], r["draft"], f"{r['acceptance']:.0%}" if spec else "-", f"{r['tokens_per_call']:.2f}",
            f"{r['drafted_rounds']:.0%}" if spec else "-", f"{r['mean_k']:.1f}" if spec else "-",
            f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x",
            f"{p['cpu_seconds'] / r['cpu_seconds']:.2f}x", "identical" if r["identical"] else "CHANGED",
        ]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drafts", default="lookup,layers:8,int8,int4,bf16")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--prompts", type=int, default=2, help="passages per task")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--passage-tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=4, help="draft tokens per round (the start value when adaptive)")
    p.add_argument("--k-max", type=int, default=8)
    p.add_argument("--fixed-k", action="store_true", help="keep k fixed instead of adapting it")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and draft (the fastest counts)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--allow-slow", action="store_true",
                   help="time an int8/int4 draft even when a layer fell back to the reference path (default: exit 1)")
    p.add_argument("--json", default=None)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SystemExit(f"{args.json} exists; pass --overwrite to replace it")
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(MODEL)
    t0 = time.perf_counter()
    rows = measure(model, tokenizer, args)
    print(f"speculative decoding, {MODEL}, greedy, {args.new_tokens} new tokens x {args.prompts} prompts per task, "
          f"{args.threads} thread(s), k={args.k}{' fixed' if args.fixed_k else ' adaptive'}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(table(rows))
    prompt = prompt_ids(args.tasks.split(",")[0], passages(tokenizer, 1, args.passage_tokens)[0], tokenizer)
    t_loop, t_plain, same = loop_reference(model, prompt, args.new_tokens)
    print(f"the plain baseline above vs slimlm's decode loop (loop.generate), one {args.tasks.split(',')[0]} prompt, "
          f"whole generation with prefill: {t_plain:.2f} s vs {t_loop:.2f} s (baseline takes {t_plain / t_loop:.2f}x "
          f"the loop's time); outputs {'identical' if same else 'DIFFER'}")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    changed = [f"{r['task']}/{r['draft']}" for r in rows if not r["identical"]] + ([] if same else ["loop"])
    assert not changed, f"speculative greedy changed the output: {changed}"


if __name__ == "__main__":
    main()
