"""evaluate(): one model on one protocol -> Result."""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable

import torch
from torch import nn

from slimlm.data import token_windows, tokenize_documents
from slimlm.errors import SlimlmError
from slimlm.eval.cache import cache_key, load_base_stats, store_base_stats
from slimlm.eval.protocol import Protocol, for_tokenizer, get_protocol
from slimlm.eval.quality import BaseStats, Quality, score_windows
from slimlm.eval.result import Result
from slimlm.kernels import kernel_summary
from slimlm.models.size import measure_size
from slimlm.eval.speed import measure_speed

log = logging.getLogger("slimlm.eval")


def eval_tokens(tokenizer: Any, protocol: str | Protocol) -> torch.Tensor:
    """The protocol's evaluation text, tokenized once. -> (N,) int64."""
    return tokenize_documents(tokenizer, get_protocol(protocol).evaluation_documents())


def eval_windows(tokens: torch.Tensor, protocol: Protocol, *, n_tokens: int | None, full: bool) -> torch.Tensor:
    """(N,) -> (W, window): the locked windows; the protocol's budget unless ``full``.

    A user's text shorter than the default budget is scored whole (in whole
    windows); an explicit ``n_tokens`` larger than the text is still refused.
    With ``protocol.bos`` (``for_tokenizer``) each window is BOS and ``window - 1`` text tokens.
    """
    budget = None if full else (n_tokens or protocol.eval_tokens)
    text = protocol.eval_text
    step = protocol.window - (protocol.bos is not None)  # text tokens per window
    if text is not None:
        if tokens.numel() < step:
            raise SlimlmError(f"the evaluation text {text.source} holds {tokens.numel():,} tokens, fewer than "
                              f"one window of {step} needed to score it; pass a longer text")
        if n_tokens is None and budget is not None:
            budget = min(budget, tokens.numel() // step * protocol.window)
    return token_windows(tokens, window=protocol.window, n_tokens=budget, bos=protocol.bos)


def _prompt(tokens: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """(N,) -> (<= prompt_tokens,): the speed workload's prompt, BOS first when the windows have it."""
    if protocol.bos is None:
        return tokens[: protocol.prompt_tokens]
    return torch.cat([tokens.new_tensor([protocol.bos]), tokens[: protocol.prompt_tokens - 1]])


def _key(model_id: str | None, windows: torch.Tensor, protocol: Protocol) -> str | None:
    if model_id is None:
        return None
    text = protocol.eval_text.sha256 if protocol.eval_text else None
    return cache_key(model_id=model_id, protocol=protocol.name, windows=windows, top_k=protocol.kl_top_k,
                     text_sha256=text)


def _score_self(model: nn.Module, windows: torch.Tensor, protocol: Protocol, model_id: str | None) -> Quality:
    """Score a model as its own base; its outputs are cached for later comparisons."""
    key = _key(model_id, windows, protocol)
    stats = load_base_stats(key) if key else None
    if stats is not None:
        return score_windows(model, windows, base=stats)[0]
    quality, stats = score_windows(model, windows, collect_top_k=protocol.kl_top_k)
    if key:
        store_base_stats(key, stats, meta={"base": model_id, "protocol": protocol.name})
    return quality


def base_stats_for(
    windows: torch.Tensor, protocol: Protocol, *, base_id: str | None, load_base: Callable[[], nn.Module]
) -> BaseStats:
    """The base model's outputs on ``windows``: from the disk cache, or computed and cached."""
    key = _key(base_id, windows, protocol)
    stats = load_base_stats(key) if key else None
    if stats is not None:
        log.info("base outputs for %s read from cache", base_id)
        return stats
    base = load_base()
    _, stats = score_windows(base, windows, collect_top_k=protocol.kl_top_k, desc="base outputs")
    del base
    gc.collect()
    if key:
        store_base_stats(key, stats, meta={"base": base_id, "protocol": protocol.name})
    return stats


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    source: str,
    protocol: str | Protocol = "wiki-v1",
    n_tokens: int | None = None,
    full: bool = False,
    model_id: str | None = None,
    base_source: str | None = None,
    base_id: str | None = None,
    load_base: Callable[[], nn.Module] | None = None,
    speed: bool = True,
    compile_speed: bool = False,
    model_dir: str | None = None,
    recipe: Any = None,
    stream: torch.Tensor | None = None,
) -> Result:
    """Measure quality, size and speed of ``model`` on ``protocol``.

    ``base_source``/``load_base`` name and load the model KL is measured
    against; without them the model is its own base (KLD 0, agreement 1).
    ``model_id``/``base_id`` are stable identities (source plus file
    fingerprint) that key the on-disk cache of base outputs; None disables it.
    ``stream`` is the protocol's evaluation text already tokenized
    (``eval_tokens``), when a caller measures several models with one tokenizer.
    ``compile_speed`` times decode with the compiled step (``measure_speed(compile=True)``).
    A tokenizer that adds BOS measures ``<protocol>+bos`` (see ``for_tokenizer``).
    """
    proto = for_tokenizer(protocol, tokenizer)
    tokens = eval_tokens(tokenizer, proto) if stream is None else stream
    windows = eval_windows(tokens, proto, n_tokens=n_tokens, full=full)
    is_self = base_source is None or load_base is None
    if is_self:
        quality = _score_self(model, windows, proto, model_id)
    else:
        stats = base_stats_for(windows, proto, base_id=base_id, load_base=load_base)
        quality, _ = score_windows(model, windows, base=stats)
    spd = None
    if speed:
        spd = measure_speed(model, _prompt(tokens, proto), new_tokens=proto.new_tokens, runs=proto.speed_runs,
                            compile=compile_speed)
    return Result(
        protocol=proto.name,
        model=source,
        base=source if is_self else base_source,
        quality=quality,
        size=measure_size(model, model_dir=model_dir),
        speed=spd,
        recipe=recipe,
        text_source=proto.eval_text.source if proto.eval_text else None,
        text_sha256=proto.eval_text.sha256 if proto.eval_text else None,
        kernels=kernel_summary(model),
    )

