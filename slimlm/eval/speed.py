"""Prefill and decode speed at batch 1, with per-token latency percentiles.

Decode at small batch is memory-bound: every weight is read once per token.
So beside tokens/s we report the achieved bandwidth, weight bytes read per
token x tokens/s, to compare with what the machine can move (~35 GB/s here).

The timed loop is slimlm's own (what ``slimlm generate`` runs): the fast
decoder over a static KV cache where the family allows it, else the HF
forward behind the same interface (``Speed.loop`` says which); with
``compile=True`` the one-token steps run under ``torch.compile``
(compiled and warmed before timing). Results written before this field
existed timed the HF forward and load as ``loop="hf"``.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.generation import CompiledStep, FastDecoder, compile_step, make_decoder
from slimlm.models.size import bytes_read_per_token


@dataclass(frozen=True)
class Speed:
    prefill_tokens_per_s: float  # median over runs
    decode_tokens_per_s: float  # median over runs
    latency_p50_ms: float  # per decode step, all timed steps pooled
    latency_p95_ms: float
    achieved_gb_per_s: float  # bytes read per token x decode tokens/s
    bytes_per_token: int
    peak_rss_mb: float  # peak resident memory of the process so far
    prompt_tokens: int
    new_tokens: int
    runs: int
    threads: int
    loop: str = "hf"  # "slimlm" (fast decoder), "slimlm-compiled", or "hf" (the HF forward)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _one_run(decoder: nn.Module, step, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """One greedy generation in slimlm's loop: (prefill seconds, per-step decode seconds)."""
    device = next(decoder.parameters()).device
    ids = prompt.unsqueeze(0).to(device)  # (1, P)
    P = ids.shape[1]
    cache = decoder.new_cache(1, P + new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    logits = decoder(ids, torch.arange(P, device=device)[None], cache, n_logits=1)
    nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    _sync(device)
    prefill, steps = time.perf_counter() - t0, []
    for i in range(new_tokens - 1):
        t0 = time.perf_counter()
        pos = torch.full((1, 1), P + i, dtype=torch.long, device=device)
        nxt = step(nxt, pos, cache)[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def _loop(model: nn.Module, compile: bool, kv_dtype: str | None = None) -> tuple[nn.Module, object, str]:
    """(decoder, step, loop name): the fast decoder when it can run ``model``, else the HF forward."""
    try:
        decoder = make_decoder(model, kv_dtype=kv_dtype)
    except SlimlmError:  # a fast family with a module the lean forward cannot call
        decoder = make_decoder(model, fast=False, kv_dtype=kv_dtype)  # kv_dtype: a clear error
    name = "slimlm" if isinstance(decoder, FastDecoder) else "hf"
    name += f"-kv-{kv_dtype}" if kv_dtype is not None else ""
    if not compile:
        return decoder, decoder, name
    return decoder, compile_step(decoder), name + "-compiled"


@dataclass(frozen=True)
class DecodeLoop:
    """slimlm's decode loop over one model, warmed up (and compiled): ``run`` times one greedy generation."""

    decoder: nn.Module
    step: object
    name: str  # as Speed.loop

    def run(self, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
        """(prefill seconds, per-step decode seconds) of ``prompt`` (P,) and ``new_tokens`` greedy tokens."""
        return _one_run(self.decoder, self.step, prompt, new_tokens)


def warmed_loop(model: nn.Module, prompt: torch.Tensor, *, compile: bool = False, kv_dtype: str | None = None,
                warmup_tokens: int = 8) -> DecodeLoop:  # fmt: skip
    """slimlm's loop for ``model`` after a warm-up run of ``warmup_tokens`` on the start of ``prompt`` (which
    also compiles the step with ``compile=True``). ``kv_dtype``: the fast decoder's KV cache dtype
    (``make_decoder``); the loop is then named e.g. ``slimlm-kv-float16``."""
    decoder, step, loop = _loop(model, compile, kv_dtype)
    _one_run(decoder, step, prompt[: min(32, len(prompt))], warmup_tokens)
    if isinstance(step, CompiledStep) and step.failed is not None:
        loop = loop.removesuffix("-compiled")  # the compiler failed: the steps ran eagerly (logged)
    return DecodeLoop(decoder, step, loop)


def measure_speed(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int = 128, runs: int = 3,
                  compile: bool = False, kv_dtype: str | None = None) -> Speed:
    """Time a ``prompt`` (P,) prefill and ``new_tokens`` greedy steps in slimlm's loop (:func:`warmed_loop`);
    medians over ``runs``."""
    loop = warmed_loop(model, prompt, compile=compile, kv_dtype=kv_dtype, warmup_tokens=min(8, new_tokens))
    prefills, decodes, steps_all = [], [], []
    for _ in tqdm(range(runs), desc="speed", unit="run", leave=False):
        prefill, steps = loop.run(prompt, new_tokens)
        prefills.append(len(prompt) / prefill)
        decodes.append(len(steps) / sum(steps))
        steps_all.extend(steps)
    steps_ms = sorted(s * 1000 for s in steps_all)
    q = statistics.quantiles(steps_ms, n=100, method="inclusive")  # q[k-1] = k-th percentile
    decode = statistics.median(decodes)
    per_token = bytes_read_per_token(model)
    return Speed(
        prefill_tokens_per_s=statistics.median(prefills),
        decode_tokens_per_s=decode,
        latency_p50_ms=q[49],
        latency_p95_ms=q[94],
        achieved_gb_per_s=per_token * decode / 1e9,
        bytes_per_token=per_token,
        peak_rss_mb=peak_rss_mb(),
        prompt_tokens=len(prompt),
        new_tokens=new_tokens,
        runs=runs,
        threads=torch.get_num_threads(),
        loop=loop.name,
    )
