"""`slimlm compress | eval | export | recipes | info | generate | sweep | report`: parse arguments, call the library, print.

Library errors (SlimlmError) become one line on stderr and a non-zero exit;
anything else is a bug and shows its traceback under --debug.

Each command imports the library inside its function, so that ``slimlm
--help`` and argument errors stay instant: measured 0.13 s that way against
12 s with the pipelines (torch, transformers, every method) imported at the
top, on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from slimlm.cli_parser import DEFAULT_MODEL, Commands
from slimlm.cli_parser import build_parser as _build_parser
from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm")



def _setup(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("slimlm").setLevel(logging.DEBUG if args.debug else logging.INFO)
    from slimlm.validate import check_pos_int

    if args.threads is not None:
        check_pos_int("--threads", args.threads, "torch CPU threads")
    import torch
    import transformers

    if not args.debug:
        transformers.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _load(source: str, dtype: str):
    import torch

    from slimlm.models import load_model

    return load_model(source, dtype=getattr(torch, dtype))


def _dtype(args: argparse.Namespace):
    import torch

    return getattr(torch, args.dtype)


def _check_output(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise SlimlmError(f"{path} already exists; pass --overwrite to replace it")


def cmd_eval(args: argparse.Namespace) -> int:
    from slimlm.eval import format_results, save_results
    from slimlm.pipelines.evaluate import evaluate_sources

    _check_output(args.json, args.overwrite)
    sources = args.models or [DEFAULT_MODEL]
    if len(sources) > 1 and not args.compare:
        raise SlimlmError("several models given: pass --compare to evaluate them side by side")
    tasks = None
    if args.tasks is not None:
        from slimlm.eval.accuracy import parse_tasks

        tasks = parse_tasks(args.tasks)
        if not (args.verbose or args.debug):  # HFLM's notes on being handed a loaded model, truncation, ...
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
    elif args.task_limit is not None:
        raise SlimlmError("--task-limit is for --tasks; add --tasks (e.g. --tasks slimlm_wiki_lastword)")
    results = evaluate_sources(sources, protocol=args.protocol, eval_data=args.eval_data, base=args.base,
                               tokens=args.tokens, full=args.full, speed=not args.no_speed, dtype=_dtype(args),
                               compile_speed=args.compile, tasks=tasks, task_limit=args.task_limit)
    print(format_results(results))
    if args.json:
        save_results(args.json, results, overwrite=args.overwrite)
        log.info("wrote %s", args.json)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from slimlm.eval import save_results
    from slimlm.pipelines.compress import compress

    _check_output(args.json, args.overwrite)
    report = compress(args.model, args.recipe, out=args.out, protocol=args.protocol, calib_data=args.calib_data,
                      eval_data=args.eval_data, calib_samples=args.calib_samples, tokens=args.tokens, full=args.full,
                      speed=not args.no_speed, dtype=_dtype(args), lazy=args.lazy, overwrite=args.overwrite)
    print(report.summary())
    if args.json:
        save_results(args.json, report.results, overwrite=args.overwrite)
        log.info("wrote %s", args.json)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slimlm.export import EXPORTERS, export

    if args.format not in EXPORTERS:
        raise SlimlmError(f"unknown export format {args.format!r}; valid: {', '.join(EXPORTERS)}")
    gguf = {"float_type": args.float_type, "requantize": args.requantize}
    if args.format != "gguf" and any(v is not None for v in gguf.values()):
        raise SlimlmError("--float-type and --requantize are GGUF options; add --format gguf or drop them")
    _check_output(args.out, args.overwrite)
    options = {k: v for k, v in gguf.items() if v is not None} if args.format == "gguf" else {}
    export(args.checkpoint, args.out, format=args.format, overwrite=args.overwrite, **options)
    print(f"wrote {EXPORT_WHAT[args.format]} to {args.out}")
    if args.requantize:
        from slimlm.export.verify import export_kld

        kld, tokens = export_kld(args.checkpoint, args.out, protocol=args.protocol)
        print(f"re-quantized to {args.requantize}: KLD {kld:.4f} against the checkpoint on {tokens:,} "
              f"{args.protocol} tokens (transformers' GGUF reader)")
    return 0


EXPORT_WHAT = {"hf": "a dequantized HF model", "gguf": "a GGUF file (llama.cpp)",
               "compressed-tensors": "a compressed-tensors model (vLLM, transformers)"}  # fmt: skip


def cmd_recipes(args: argparse.Namespace) -> int:
    from slimlm.methods import METHODS
    from slimlm.recipe import load_recipe, shipped_recipes

    for name, path in sorted(shipped_recipes().items()):
        comment = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        steps = ", ".join(type(s).__name__ for s in load_recipe(name).steps)
        print(f"{name:20s} {steps:16s} {comment}")
    print("\nmethods (a recipe step's `method:`; calib: needs calibration text; lazy: runs with --lazy)")
    for name, m in METHODS.items():
        calib = "calib?" if callable(m.calibration) else "calib" if m.calibration else ""
        print(f"{name:20s} {m.config.__name__:16s} {calib:6s} {'lazy' if m.lazy else '':4s} {m.summary}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from slimlm.models import format_info, model_info

    model, _ = _load(args.model, args.dtype)
    print(format_info(model_info(model)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from slimlm.generation import generate_text

    if not args.model_and_prompt:
        raise SlimlmError('generate needs a prompt: slimlm generate [MODEL] "PROMPT"')
    if len(args.model_and_prompt) > 2:
        raise SlimlmError('usage: slimlm generate [MODEL] "PROMPT" (quote the prompt)')
    *maybe_model, prompt = args.model_and_prompt
    _check_sampling_flags(args)
    _check_draft_flags(args)
    _check_kv_flags(args)
    _check_compile_flag(args)
    model, tokenizer = _load(maybe_model[0] if maybe_model else DEFAULT_MODEL, args.dtype)
    kv = _kv_decoder(args, model)  # None without --kv-* flags
    prompt = _chat_prompt(args, tokenizer, prompt)
    if args.draft is not None:
        return _generate_speculative(args, model, tokenizer, prompt)
    for piece in generate_text(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        engine=args.engine,
        decoder=kv,
        compile=args.compile,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if getattr(kv, "last_cache", None) is not None:
        from slimlm.eval.longtext import kind_name

        print(f"KV cache {kind_name(kv.kind)}: {kv.last_cache.nbytes() / 1e6:.2f} MB held", file=sys.stderr)
    return 0


def _check_compile_flag(args: argparse.Namespace) -> None:
    if not args.compile:
        return
    if args.engine != "slimlm":
        raise SlimlmError("--compile compiles slimlm's decode step; drop --engine hf")
    if args.draft is not None or (args.kv_policy, args.kv_budget, args.kv_bits) != (None, None, None):
        raise SlimlmError("--compile runs the plain decode loop; drop --draft and the --kv-* flags")


def _check_sampling_flags(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise SlimlmError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise SlimlmError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SlimlmError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise SlimlmError(f"--top-k must be >= 1, got {args.top_k}")


def _chat_prompt(args: argparse.Namespace, tokenizer, prompt: str) -> str:
    """generate --chat: the prompt wrapped in the model's chat template."""
    if not args.chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise SlimlmError("this tokenizer has no chat template; drop --chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip


def _check_kv_flags(args: argparse.Namespace) -> None:
    if (args.kv_policy, args.kv_budget, args.kv_bits, args.kv_dtype) != (None,) * 4 and (
            args.draft is not None or args.engine != "slimlm"):
        raise SlimlmError("--kv-policy/--kv-budget/--kv-bits/--kv-dtype run on slimlm's decode loop without a "
                          "draft; drop --draft / --engine hf")


def _kv_decoder(args: argparse.Namespace, model):
    """generate --kv-policy / --kv-bits / --kv-dtype: a decoder over that KV cache, or None."""
    if (args.kv_policy, args.kv_budget, args.kv_bits, args.kv_dtype) == (None,) * 4:
        return None
    from slimlm.generation import make_decoder

    decoder = make_decoder(model, kv_dtype=args.kv_dtype)
    return kv_decoder(decoder, policy=args.kv_policy, budget=args.kv_budget, sinks=args.kv_sinks,
                      bits=args.kv_bits) or decoder


def kv_decoder(decoder, *, policy: str | None, budget: int | None, sinks: int = 4, bits: int | None = None):
    """--kv-policy / --kv-budget / --kv-sinks / --kv-bits -> a decoder with a compressed cache, or None for
    the plain static cache."""
    from slimlm.generation.kv import KIVI, KVCompressedDecoder, parse_policy

    if bits is not None and policy not in (None, "full"):
        raise SlimlmError("--kv-bits (a KIVI-quantized full cache) and --kv-policy (eviction) do not combine; "
                          "choose one")
    if bits is not None:
        return KVCompressedDecoder(decoder, KIVI(bits))
    if policy is None and budget is not None:
        raise SlimlmError("--kv-budget needs --kv-policy (window, sinks or h2o)")
    if policy not in (None, "full") and budget is None:
        raise SlimlmError(f"--kv-policy {policy} needs a budget (--kv-budget, tokens kept in the cache)")
    kind = parse_policy(policy, budget, sinks=sinks) if policy is not None else None
    return KVCompressedDecoder(decoder, kind) if kind is not None else None


def _check_draft_flags(args: argparse.Namespace) -> None:
    used = [f for f, v in (("--k", args.k), ("--fixed-k", args.fixed_k), ("--no-baseline", args.no_baseline),
                           ("--json", args.json)) if v not in (None, False)]  # fmt: skip
    if args.draft is None and used:
        raise SlimlmError(f"{', '.join(used)}: for speculative decoding only; add --draft (e.g. --draft lookup)")
    if args.draft is not None and args.engine != "slimlm":
        raise SlimlmError("--draft runs on slimlm's decode loop; drop --engine hf")
    if args.k is not None and args.k < 1:
        raise SlimlmError(f"--k (draft tokens per round) must be >= 1, got {args.k}")
    _check_output(args.json, args.overwrite)


def _generate_speculative(args: argparse.Namespace, model, tokenizer, prompt: str) -> int:
    """generate --draft: stream the output, then say what the draft bought (stderr, and --json)."""
    import json

    from slimlm.data import prompt_ids
    from slimlm.fsutil import atomic_write_text
    from slimlm.generation.sampling import Sampling
    from slimlm.generation.speculative import SpecConfig, run_speculative, text_writer
    from slimlm.generation.stream import stop_token_ids
    from slimlm.pipelines.drafts import make_draft

    k = args.k or 4
    config = SpecConfig(k=k, adaptive=not args.fixed_k, k_max=max(args.k_max, k))
    ids = prompt_ids(tokenizer, prompt)  # BOS first when the tokenizer adds it, never twice (--chat)
    if not ids:
        raise SlimlmError("the prompt is empty after tokenization; give some text")
    report = run_speculative(
        model, ids, make_draft(args.draft, model, tokenizer), max_new_tokens=args.max_new_tokens, config=config,
        sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed), stop_ids=stop_token_ids(model, tokenizer),
        baseline=not args.no_baseline, on_tokens=text_writer(tokenizer, sys.stdout),
    )  # fmt: skip
    sys.stdout.write("\n")
    print(report.summary(), file=sys.stderr)
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slimlm.sweep.report import write_report

    path = write_report(args.folder, args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """One line per finished job over an overall bar, then the comparison table; exit 1 if any job failed."""
    from tqdm import tqdm

    from slimlm.sweep import parse_grid, sweep

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bar = None

    def on_job(outcome, n_jobs: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=n_jobs, desc="sweep", unit="job", file=sys.stderr)
        bar.write(outcome.line(), file=sys.stdout)
        bar.update(1)

    try:
        report = sweep(args.model, recipes, grid=parse_grid(args.grid or []), out=args.out, protocol=args.protocol,
                       tokens=args.tokens, calib_samples=args.calib_samples, jobs=args.jobs, ray=args.ray,
                       ray_address=args.ray_address, keep_models=args.keep_models, speed=not args.no_speed,
                       threads=args.job_threads, gpus_per_job=args.job_gpus, memory_per_job_gb=args.job_memory,
                       on_job=on_job)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    print(report.table())
    if report.failed:
        print(f"{len(report.failed)} of {len(report.jobs)} jobs failed (recorded in {report.out}/jobs; a re-run "
              "retries them)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


COMMANDS: Commands = {"eval": cmd_eval, "compress": cmd_compress, "export": cmd_export, "recipes": cmd_recipes,
                      "info": cmd_info, "generate": cmd_generate, "sweep": cmd_sweep, "report": cmd_report}


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _setup(args)
        return args.func(args)
    except SlimlmError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
