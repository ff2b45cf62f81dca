"""The argparse side of `slimlm`: every subcommand's options and help, nothing that runs.

:mod:`slimlm.cli` passes in the functions that run each command, so this
module imports nothing of the library and ``slimlm --help`` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Callable

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")

Commands = dict[str, Callable[[argparse.Namespace], int]]


def _add_compress_parsers(sub: argparse._SubParsersAction, commands: Commands) -> None:
    c = sub.add_parser("compress", help="compress a model with a recipe, save it, and compare it with the base")
    c.add_argument("--model", default=DEFAULT_MODEL, help=f"model to compress (default {DEFAULT_MODEL})")
    c.add_argument("--recipe", default="default", help="shipped recipe name or YAML file (default: 'default', int8)")
    c.add_argument("--out", default=None, help="output directory (default out/<model>-<recipe>)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory / --json file")
    c.add_argument("--protocol", default="wiki-v1")
    c.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's)")
    c.add_argument("--full", action="store_true", help="score the whole evaluation set")
    c.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    c.add_argument("--json", default=None, help="write base and compressed results as JSON")
    c.add_argument("--calib-samples", type=int, default=None,
                   help="calibration sequences of 512 tokens for calibrated methods (default: the protocol's 128)")
    c.add_argument("--calib-data", default=None, metavar="SOURCE",
                   help="calibrate on your own text: a .txt file (paragraphs = documents), a .jsonl file "
                        "({\"text\": ...} per line) or hf:<path>[:<config>]:<split>[:<column>]; given with the same "
                        "--eval-data, the text is split by document like the protocol's")
    c.add_argument("--eval-data", default=None, metavar="SOURCE",
                   help="measure on your own text (same sources as --calib-data) instead of the protocol's; the "
                        "results name it by source and sha256")
    c.add_argument("--dtype", default="float32", choices=DTYPES)
    c.add_argument("--lazy", action="store_true",
                   help="read block weights from disk as needed and write the checkpoint block by block, for "
                        "models larger than memory (one-step RTN/GPTQ/AWQ recipes, and mixed precision with "
                        "sensitivity: hessian)")
    c.set_defaults(func=commands["compress"])

    x = sub.add_parser("export", help="write a compressed checkpoint for another engine (HF, GGUF, compressed-tensors)")
    x.add_argument("checkpoint")
    x.add_argument("--format", default="hf", help="hf (dequantized), gguf (llama.cpp) or compressed-tensors "
                                                   "(vLLM, transformers)")
    x.add_argument("--float-type", choices=("f16", "f32", "bf16", "q8_0"), default=None,
                   help="gguf: type of the float matrices (default f16; norms stay f32)")
    x.add_argument("--requantize", choices=("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"), default=None,
                   help="gguf: re-round weights no GGUF type holds code for code to this type (prints the KLD "
                        "it costs)")
    x.add_argument("--protocol", default="wiki-v1", help="text for the --requantize KLD (default wiki-v1)")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=commands["export"])


def _add_generate_parser(sub: argparse._SubParsersAction, commands: Commands) -> None:
    g = sub.add_parser("generate", help="stream text from a model")
    g.add_argument("model_and_prompt", nargs="*", metavar="[MODEL] PROMPT")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--engine", default="slimlm", choices=("slimlm", "hf"),
                   help="slimlm's decode loop (default) or HF generate, for comparison")
    g.add_argument("--compile", action="store_true",
                   help="run slimlm's one-token steps under torch.compile (C++ wrapper on CPU): ~1.6x faster "
                        "steps on the built-in model after a one-time compile (cached on disk by inductor)")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--draft", default=None,
                   help="speculative decoding with a draft: lookup[:N] (prompt n-grams), layers:N (the model's first "
                        "N layers), int4 / int8 / bf16 / <scheme> (a compressed copy), recipe:<name>, or a model "
                        "with the same tokenizer; reports acceptance, tokens per target call and speedup on stderr")
    g.add_argument("--k", type=int, default=None, help="with --draft: draft tokens per round (default 4; the first "
                                                        "round's when k adapts)")
    g.add_argument("--k-max", type=int, default=8, help="with --draft: the most tokens adaptive k drafts (default 8)")
    g.add_argument("--fixed-k", action="store_true", help="with --draft: keep k fixed instead of adapting it to "
                                                            "measured costs (sampled output then repeats for a seed)")
    g.add_argument("--no-baseline", action="store_true",
                   help="with --draft: skip the plain-decoding run that measures the speedup")
    g.add_argument("--json", default=None, help="with --draft: write tokens, acceptance, costs and speedup as JSON")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    g.add_argument("--kv-policy", default=None, choices=("full", "window", "sinks", "h2o"),
                   help="KV-cache eviction: window (recent tokens), sinks (StreamingLLM: first --kv-sinks tokens + "
                        "recent), h2o (heavy hitters + recent); needs --kv-budget")
    g.add_argument("--kv-budget", type=int, default=None, help="tokens the KV cache keeps (with --kv-policy)")
    g.add_argument("--kv-sinks", type=int, default=4, help="sink tokens for --kv-policy sinks (default 4)")
    g.add_argument("--kv-bits", type=int, default=None, choices=(2, 4, 8),
                   help="KIVI-quantized KV cache (keys per channel, values per token, 128 recent tokens in float)")
    g.add_argument("--kv-dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="what slimlm's KV cache stores keys and values in (default: the model's dtype); float16 "
                        "halves the cache and the bytes decode attention reads, as llama.cpp's default cache does")
    g.set_defaults(func=commands["generate"])


def _add_sweep_parser(sub: argparse._SubParsersAction, commands: Commands) -> None:
    s = sub.add_parser("sweep", help="compress a model with many recipes (and a grid of their fields) and measure "
                                     "each; resumable, locally or on Ray")  # fmt: skip
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model to compress (default {DEFAULT_MODEL})")
    s.add_argument("--recipes", required=True, help="comma-separated shipped recipe names or YAML files")
    s.add_argument("--grid", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="cross every recipe with these values of a step field it has (bits, group_size, "
                        "sparsity, ...), e.g. --grid bits=3,4 group_size=32,64")
    s.add_argument("--out", required=True, help="the sweep folder (runs/NAME); a re-run resumes it")
    s.add_argument("--protocol", default="wiki-v1")
    s.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's)")
    s.add_argument("--calib-samples", type=int, default=None,
                   help="calibration sequences of 512 tokens for calibrated methods (default: the protocol's 128)")
    s.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    s.add_argument("--keep-models", action="store_true", help="keep each compressed checkpoint in jobs/<id>/model")
    s.add_argument("--jobs", type=int, default=1, help="jobs at a time (default 1; the size of a --ray runtime)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--ray", action="store_true", help="run each job as a Ray task on a runtime started here")
    where.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run each job as a Ray task on the cluster at ADDR (host:port, ray://host:port, auto); "
                            "--out must be a path every node sees")
    s.add_argument("--job-threads", type=int, default=None,
                   help="torch threads per job, and the CPUs each Ray task requests (default: threads / --jobs)")
    s.add_argument("--job-gpus", type=float, default=0.0, help="GPUs each Ray task requests (default 0)")
    s.add_argument("--job-memory", type=float, default=None, metavar="GB", help="memory each Ray task requests")
    s.set_defaults(func=commands["sweep"])


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like the library's refusals (subparsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser(commands: Commands) -> argparse.ArgumentParser:
    """The whole command line; ``commands`` maps each subcommand's name to the function that runs it."""
    p = _Parser(prog="slimlm", description="Compress language models and measure what it cost.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="show info logs from libraries too")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="measure models on a locked protocol")
    e.add_argument("models", nargs="*", help=f"built-in name, HF directory, hub id, .gguf, or a result .json (default {DEFAULT_MODEL})")
    e.add_argument("--protocol", default="wiki-v1", help="measurement protocol (default wiki-v1)")
    e.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default: the protocol's 16,384)")
    e.add_argument("--eval-data", default=None, metavar="SOURCE",
                   help="measure on your own text instead of the protocol's: a .txt or .jsonl file, or "
                        "hf:<path>[:<config>]:<split>[:<column>]; the result names it by source and sha256")
    e.add_argument("--full", action="store_true", help="score the whole evaluation set")
    e.add_argument("--compare", action="store_true", help="evaluate several models side by side, deltas vs the first")
    e.add_argument("--base", default=None, help="model that KL divergence is measured against (default: the first model)")
    e.add_argument("--json", default=None, help="write the result(s) as JSON")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    e.add_argument("--compile", action="store_true",
                   help="time decode with the one-token step under torch.compile (compiled before timing)")
    e.add_argument("--dtype", default="float32", choices=DTYPES)
    e.add_argument("--tasks", default=None, metavar="A,B",
                   help="also score lm-evaluation-harness tasks (needs pip install 'slimlm[tasks]'): slimlm's local "
                        "slimlm_wiki_lastword, slimlm_pydoc_choice, or any lm-eval task (hub data)")
    e.add_argument("--task-limit", type=int, default=None, metavar="N",
                   help="with --tasks: score the first N examples of each task (default all)")
    e.set_defaults(func=commands["eval"])

    _add_compress_parsers(sub, commands)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=commands["recipes"])

    i = sub.add_parser("info", help="architecture, parameters, size and linears of a model")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.add_argument("--dtype", default="float32", choices=DTYPES)
    i.set_defaults(func=commands["info"])

    _add_generate_parser(sub, commands)
    _add_sweep_parser(sub, commands)

    rp = sub.add_parser("report", help="write a sweep folder's results as one self-contained HTML page with plots")
    rp.add_argument("folder", help="the --out folder of `slimlm sweep` (runs/NAME)")
    rp.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    rp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    rp.set_defaults(func=commands["report"])
    return p
