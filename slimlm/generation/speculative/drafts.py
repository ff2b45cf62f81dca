"""Drafts for speculative decoding (:mod:`slimlm.generation.speculative.loop`).

- ``ModelDraft``: any causal LM with the target's tokenizer, run on its own KV cache (behind a
  :class:`~slimlm.generation.speculative.runner.DecoderRunner`): a smaller model of the family,
  the target's own first blocks (:func:`~slimlm.generation.speculative.shallow.shallow_view`),
  or a compressed copy of the target (made in :mod:`slimlm.pipelines.drafts`, which sits above
  compression).
- ``PromptLookupDraft``: no model at all; the tokens that followed the latest earlier occurrence
  of the context's last n-gram (Saxena 2023, "Prompt lookup decoding"). Deterministic: its
  proposals carry no probabilities (q is one-hot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative.verify import warped_probs


@dataclass(frozen=True)
class DraftProposal:
    tokens: Tensor  # (k,) long
    probs: Tensor | None = None  # (k, V) float32, q of each token; None for a deterministic draft


def fit_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Draft logits (..., V_d) on the target's vocabulary (V,): extra ids dropped, missing ids -inf."""
    extra = vocab_size - logits.shape[-1]
    if extra <= 0:
        return logits[..., :vocab_size]
    return torch.nn.functional.pad(logits, (0, extra), value=-float("inf"))


class ModelDraft:
    """A model (behind a Runner: ``feed`` / ``crop`` / ``length``) proposing k tokens autoregressively."""

    def __init__(self, runner: Any, *, vocab_size: int, name: str, cost: float):
        self.runner, self.vocab_size, self.name, self.cost = runner, vocab_size, name, cost

    def propose(self, context: Tensor, k: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> DraftProposal:  # fmt: skip
        """k tokens after ``context`` (L,); the cache then holds the context and the first k-1 of them."""
        self.runner.crop(min(self.runner.length, context.numel() - 1))  # at least one token to read
        logits = self.runner.feed(context[self.runner.length:], n_logits=1)[-1]  # (V_d,) after the whole context
        tokens, probs = [], []
        for i in range(k):
            logits = fit_vocab(logits, self.vocab_size)
            if sampling.greedy:
                tokens.append(int(logits.argmax()))
            else:
                q = warped_probs(logits[None], sampling)[0]  # (V,) warped exactly as the target's p
                tokens.append(int(torch.multinomial(q, 1, generator=generator)))
                probs.append(q)
            if i < k - 1:
                logits = self.runner.feed(context.new_tensor(tokens[-1:]), n_logits=1)[-1]
        return DraftProposal(context.new_tensor(tokens), torch.stack(probs) if probs else None)

    def rollback(self, length: int) -> None:
        self.runner.crop(min(length, self.runner.length))  # it may hold fewer: the last draft is never fed


class PromptLookupDraft:
    """Propose what followed the most recent earlier occurrence of the context's last n-gram.

    n runs from ``max_ngram`` down to ``min_ngram``; the first n with a match wins. No model,
    no cache: costs nothing when there is no match (the round is then a plain step).
    """

    cost = 0.0

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1, name: str = "lookup"):
        if not 1 <= min_ngram <= max_ngram:
            raise SlimlmError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.name = max_ngram, min_ngram, name

    def propose(self, context: Tensor, k: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> DraftProposal:  # fmt: skip
        L = context.numel()
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = context[:-1].unfold(0, n, 1)  # (L-n, n): every n-gram that has a successor
            hits = (windows == context[-n:]).all(-1).nonzero().flatten()  # start of each earlier match
            if hits.numel():
                start = int(hits[-1]) + n  # what followed the most recent match
                return DraftProposal(context[start:start + k].clone())
        return DraftProposal(context.new_empty(0))

    def rollback(self, length: int) -> None:
        return None
