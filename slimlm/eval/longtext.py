"""Long-text perplexity under a KV-cache policy: one long stream, a fixed cache budget.

The protocol's evaluation text is tokenized once and its first ``n_tokens``
form one stream (longer than the cache budget), BOS first when the tokenizer
adds it (as in every window of the protocol). Every token from the second
on is scored with the cache the policy leaves at that point, as in the
StreamingLLM paper's evaluation (Xiao et al. 2024, Sec. 4.1):

* evicting caches (window, sinks + window, H2O): the first ``budget`` tokens
  in one forward (nothing is evicted yet, so this equals stepping), then one
  token at a time;
* the full cache and KIVI caches in chunks of ``chunk`` tokens: a chunked
  forward gives the same logits as one token at a time for both (the full
  cache trivially, KIVI by construction, see ``slimlm.generation.kv.kivi.KIVICache``).

:func:`score_recompute` is the paper's "sliding window with re-computation"
reference: each token predicted from the last ``budget - stride`` to
``budget`` tokens encoded afresh (the StreamingLLM paper re-encodes for every
token, ``stride=1``; a larger stride costs ``1/stride`` as much). It is what a
cache of ``budget`` tokens could at best give, with no streaming artefacts.

Cost on a CPU is dominated by the one-token steps: about ``n_tokens - budget``
forwards of the model per evicting policy.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.data import bos_id
from slimlm.errors import SlimlmError
from slimlm.eval.protocol import get_protocol
from slimlm.eval.runner import eval_tokens
from slimlm.generation.kv import H2O, KIVI, Policy, Sinks, StaticKVCache, Window, make_kv_cache

log = logging.getLogger("slimlm.eval")


@dataclass(frozen=True)
class LongTextScore:
    name: str  # e.g. "sinks(4)+window b=512"
    tokens: int  # length of the stream
    nll: Tensor  # (tokens - 1,) float64 NLL of tokens 1..N-1
    cache_bytes: int  # bytes the cache held at the end of the stream
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())

    def perplexity_from(self, start: int) -> float:
        """Perplexity of the tokens at stream positions >= ``start`` (e.g. once the cache is full)."""
        return math.exp(self.nll[max(0, start - 1):].mean().item())


def kind_name(kind: Policy | KIVI | None) -> str:
    """A short label for tables."""
    if kind is None:
        return "full"
    if isinstance(kind, Window):
        return f"window b={kind.budget}"
    if isinstance(kind, Sinks):
        return f"sinks({kind.sinks})+window b={kind.budget}"
    if isinstance(kind, H2O):
        return f"h2o(recent {kind.n_recent}) b={kind.budget}"
    return f"kivi int{kind.bits} g{kind.group} r{kind.residual}"


def stream_tokens(tokenizer: Any, n_tokens: int, *, protocol: str = "wiki-v1") -> Tensor:
    """The first ``n_tokens`` of a protocol's evaluation text, tokenized as one stream. -> (n_tokens,)

    When the tokenizer adds BOS the stream is BOS and the first ``n_tokens - 1``
    tokens of text: BOS is context for every token, and never scored itself.
    """
    bos = bos_id(tokenizer)
    n_text = n_tokens - (bos is not None)
    ids = eval_tokens(tokenizer, get_protocol(protocol))
    if n_text > ids.numel():
        raise SlimlmError(f"--tokens {n_tokens} is more than the {protocol} evaluation text holds ({ids.numel()})")
    if bos is None:
        return ids[:n_tokens]
    return torch.cat([ids.new_tensor([bos]), ids[:n_text]])  # (n_tokens,)


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(T, V) logits, (T,) next tokens -> (T,) float64 NLL."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[:, None]).squeeze(-1).double()


@torch.inference_mode()
def score_recompute(decoder: nn.Module, ids: Tensor, budget: int, *, stride: int,
                    desc: str | None = None) -> LongTextScore:
    """Sliding window with re-computation: targets in blocks of ``stride``, each block's window re-encoded."""
    if not 1 <= stride <= budget:
        raise SlimlmError(f"stride must be in [1, budget = {budget}], got {stride}")
    N = ids.numel()
    if N < 2:
        raise SlimlmError(f"the stream needs at least 2 tokens, got {N}")
    spec = decoder.cache_spec()
    ids = ids.to(spec.device)
    first = min(budget, N)
    blocks = [(0, first)] + [(e, min(e + stride, N)) for e in range(first, N, stride)]  # positions whose logits score
    nlls = []
    t0 = time.perf_counter()
    for s, e in tqdm(blocks, desc=desc or f"recompute b={budget}", unit="fwd", leave=False):
        lo = max(0, e - budget)  # the window [lo, e) ends with the block
        logits = decoder(ids[None, lo:e], torch.arange(e - lo, device=spec.device)[None],
                         StaticKVCache(spec, batch=1, max_len=e - lo))[0]  # (e - lo, V), positions from 0
        n_scored = min(e, N - 1) - s
        if n_scored > 0:
            nlls.append(_nll(logits[s - lo: s - lo + n_scored], ids[s + 1: s + 1 + n_scored]).cpu())
    seconds = time.perf_counter() - t0
    return LongTextScore(f"recompute b={budget} stride {stride}", N, torch.cat(nlls),
                         int(spec.bytes_per_token() * first), seconds)


@torch.inference_mode()
def score_stream(decoder: nn.Module, ids: Tensor, kind: Policy | KIVI | None, *, chunk: int = 512,
                 desc: str | None = None) -> LongTextScore:
    """Score the stream ``ids (N,)`` with the cache ``kind`` (None = the full cache). See the module docstring."""
    if not hasattr(decoder, "cache_spec"):
        raise SlimlmError("long-text scoring with a KV policy needs the fast decoder (llama-like families); "
                          f"got {type(decoder).__name__}")
    if chunk < 1:
        raise SlimlmError(f"chunk must be >= 1, got {chunk}")
    N = ids.numel()
    if N < 2:
        raise SlimlmError(f"the stream needs at least 2 tokens, got {N}")
    spec = decoder.cache_spec()
    device = spec.device
    ids = ids.to(device)
    # The full and quantized caches rotate at stream positions; the decoder builds cos/sin for the
    # positions it is given even when an evicting cache rotates keys itself, so cover the stream.
    decoder.ensure_positions(N)
    if kind is None or isinstance(kind, KIVI):
        cache = StaticKVCache(spec, batch=1, max_len=N) if kind is None else make_kv_cache(spec, kind, max_len=N)
        pieces = list(range(0, N, chunk))
        ends = [min(s + chunk, N) for s in pieces]
    else:
        cache = make_kv_cache(spec, kind)
        first = min(kind.budget, N)
        pieces, ends = [0, *range(first, N)], [first, *range(first + 1, N + 1)]
    nlls = []
    t0 = time.perf_counter()
    for s, e in tqdm(list(zip(pieces, ends)), desc=desc or kind_name(kind), unit="fwd", leave=False):
        pos = torch.arange(s, e, device=device)[None]  # (1, T)
        logits = decoder(ids[None, s:e], pos, cache)[0]  # (T, V)
        n_scored = min(e, N - 1) - s  # the last token of the stream has no target
        if n_scored > 0:
            nlls.append(_nll(logits[:n_scored], ids[s + 1: s + 1 + n_scored]).cpu())
    seconds = time.perf_counter() - t0
    score = LongTextScore(kind_name(kind), N, torch.cat(nlls), cache.nbytes(), seconds)
    log.info("%s: ppl %.3f over %d tokens, cache %.1f MB, %.0f s", score.name, score.perplexity, N,
             score.cache_bytes / 1e6, seconds)
    return score
