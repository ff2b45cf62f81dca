"""Prefill and decode speed at batch 1, with per-token latency percentiles.

Decode at small batch is memory-bound: every weight is read once per token.
So beside tokens/s we report the achieved bandwidth, weight bytes read per
token x tokens/s, to compare with what the machine can move (~35 GB/s here).
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


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _one_run(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """One greedy generation: (prefill seconds, per-step decode seconds)."""
    device = next(model.parameters()).device
    ids = prompt.unsqueeze(0).to(device)  # (1, P)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache, steps = out.cache, []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        cache = out.cache
    return prefill, steps


def measure_speed(model: nn.Module, prompt: torch.Tensor, *, new_tokens: int = 128, runs: int = 3) -> Speed:
    """Time a ``prompt`` (P,) prefill and ``new_tokens`` greedy steps, after one warm-up run."""
    _one_run(model, prompt[: min(32, len(prompt))], min(8, new_tokens))  # warm-up
    prefills, decodes, steps_all = [], [], []
    for _ in tqdm(range(runs), desc="speed", unit="run", leave=False):
        prefill, steps = _one_run(model, prompt, new_tokens)
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
    )
