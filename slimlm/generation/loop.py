"""slimlm's decode loop: prefill, then one-token steps over a static KV cache.

``stream_tokens`` yields token ids of one prompt as they are chosen,
``generate`` runs many prompts in batches grouped by length (left padding:
pad tokens get position -1 and are masked), ``stream_text`` turns one stream
into text pieces. Any decoder from ``make_decoder`` works (fast or HF path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling, next_tokens

PAD_FILL = 0  # token id written at padding slots (never attended to)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stop_tokens: tuple[int, ...] = ()  # generation of a row ends after it emits one of these

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SlimlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.stop_tokens, tuple):
            object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))


def left_pad(rows: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """Prompts -> ids, positions (B, P): right-aligned, padding at position -1."""
    if not rows or any(len(r) == 0 for r in rows):
        raise SlimlmError("every prompt needs at least one token")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), PAD_FILL, dtype=torch.long, device=device)
    pos = torch.full((len(rows), P), -1, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        ids[b, P - len(row):] = torch.as_tensor(list(row), dtype=torch.long, device=device)
        pos[b, P - len(row):] = torch.arange(len(row), device=device)
    return ids, pos


def _device(decoder: nn.Module):
    return next(decoder.parameters()).device


def decode_steps(decoder: nn.Module, rows: Sequence[Sequence[int]], cfg: GenerationConfig,
                 *, step: Callable | None = None, cache_fn: Callable | None = None) -> Iterator[Tensor]:
    """Yield the (B,) tokens chosen at each step for a batch of prompts; rows that stopped repeat PAD_FILL.

    ``step`` replaces the one-token forward (e.g. a compiled one); it is
    called as ``step(ids (B, 1), positions (B, 1), cache) -> logits (B, 1, V)``.
    ``cache_fn(batch, max_len)`` builds the cache (default
    ``decoder.new_cache``; e.g. a paged one). Finished rows continue at
    position -1 (padding), so caches store nothing more for them, and a
    cache with a ``release(row)`` method frees their memory.
    """
    device = _device(decoder)
    ids, pos = left_pad(rows, device)
    B = ids.shape[0]
    cache = (cache_fn or decoder.new_cache)(B, ids.shape[1] + cfg.max_new_tokens)
    gen = None if cfg.sampling.greedy else cfg.sampling.generator(device)
    stop = torch.tensor(cfg.stop_tokens, dtype=torch.long, device=device)
    step = step if step is not None else decoder  # (a compiled module has no truth value)
    release = getattr(cache, "release", None)
    logits = decoder(ids, pos, cache, n_logits=1)[:, -1]  # prefill: (B, V)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(cfg.max_new_tokens):
        tok = next_tokens(logits, cfg.sampling, gen).masked_fill(done, PAD_FILL)  # (B,)
        yield tok
        if stop.numel():
            newly = torch.isin(tok, stop) & ~done
            done |= newly
            if release is not None:  # e.g. PagedKVCache: a finished row's blocks go back to the pool
                for row in newly.nonzero()[:, 0].tolist():
                    release(row)
            if bool(done.all()):
                return
        if i + 1 < cfg.max_new_tokens:
            logits = step(tok[:, None], next_pos.masked_fill(done[:, None], -1), cache)[:, -1]
            next_pos = next_pos + 1


def stream_tokens(decoder: nn.Module, prompt: Sequence[int], cfg: GenerationConfig, **kw) -> Iterator[int]:
    """Token ids of one prompt's continuation as they are chosen (a stop token is yielded, then the end)."""
    for tok in decode_steps(decoder, [prompt], cfg, **kw):
        yield int(tok[0])


def _trim(tokens: list[int], stop: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


def generate(decoder: nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *,
             batch_size: int = 1, **kw) -> list[list[int]]:
    """Continuations of many prompts (ending at and including a stop token), batched by length.

    Prompts are sorted by length and cut into batches of ``batch_size`` so
    each batch pads little; results come back in the order given.
    """
    if batch_size < 1:
        raise SlimlmError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        steps = [t.tolist() for t in decode_steps(decoder, [prompts[i] for i in chunk], cfg, **kw)]
        for b, i in enumerate(chunk):
            out[i] = _trim([s[b] for s in steps], cfg.stop_tokens)
    return out


def stream_text(decoder: nn.Module, tokenizer: Any, prompt_ids: Sequence[int], cfg: GenerationConfig,
                **kw) -> Iterator[str]:
    """Text pieces of one continuation as tokens arrive (held back while a character is incomplete)."""
    tokens: list[int] = []
    shown = ""
    for tok in stream_tokens(decoder, prompt_ids, cfg, **kw):
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
        shown = text
