"""Speculative decoding: a cheap draft proposes k tokens, the target checks all of them in one forward.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (ICML);
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling".

One round, with committed context ``x`` whose last token the target has not read yet::

    draft:   d_1..d_k,  d_i ~ q_i = q(. | x, d_<i)           (k cheap forwards, or a lookup)
    target:  one forward over [x_last, d_1, .., d_k] -> p_1..p_{k+1},  p_i = p(. | x, d_<i)
    accept:  n = how many of d_1..d_k survive verification
    emit:    d_1..d_n and one more token from the target (so every round emits >= 1 token)

Decoding one token costs about one read of every weight, whatever the number of tokens in the
forward, so checking k+1 positions costs little more than generating one.

Why the output is the target's own (greedy: token for token; sampling: in distribution) is
argued in :mod:`slimlm.generation.speculative.verify`, next to the functions it proves; how k
is chosen per round is :mod:`slimlm.generation.speculative.adaptive`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative.adaptive import AdaptiveK, Costs
from slimlm.generation.speculative.verify import one_hot_probs, verify_greedy, verify_sampled, warped_probs

log = logging.getLogger("slimlm.generation")


class Runner(Protocol):
    """A model with a KV cache: ``feed`` appends tokens and returns their logits."""

    @property
    def length(self) -> int: ...  # tokens held in the cache

    # (T,) -> (T, V) logits for the position after each token; only the last n_logits rows when given
    def feed(self, tokens: Tensor, *, n_logits: int | None = None) -> Tensor: ...

    def crop(self, length: int) -> None: ...  # forget everything after the first `length` tokens


class Proposal(Protocol):
    tokens: Tensor  # (k,) long
    probs: Tensor | None  # (k, V) the distribution each token was drawn from; None = deterministic


class Draft(Protocol):
    """Proposes tokens for the target to verify (see slimlm.generation.speculative.drafts)."""

    name: str
    cost: float  # time of one proposed token relative to one target step (for adaptive k)

    def propose(self, context: Tensor, k: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal: ...  # fmt: skip

    def rollback(self, length: int) -> None: ...  # the context now agrees with the first `length` tokens


@dataclass(frozen=True)
class SpecConfig:
    """k: tokens drafted per round (the first round's k when adaptive); adaptive k stays in
    k_min..k_max (k_min = 0 lets it fall back to plain steps when drafting does not pay).
    ``costs``: the timing model adaptive k optimises; None = the draft's own ``cost`` estimate
    with nearly free verification (see ``Costs``)."""

    k: int = 4
    adaptive: bool = True
    k_min: int = 0
    k_max: int = 8
    costs: Costs | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise SlimlmError(f"speculative k (draft tokens per round) must be >= 1, got {self.k}")
        if self.adaptive and self.k > self.k_max:
            raise SlimlmError(f"k ({self.k}) must be <= k_max ({self.k_max}) when k adapts; raise k_max or fix k")
        if not 0 <= self.k_min <= self.k_max or self.k_max < 1:
            raise SlimlmError(f"adaptive k needs 0 <= k_min <= k_max and k_max >= 1, got k_min={self.k_min}, "
                              f"k_max={self.k_max}")


@dataclass
class SpecStats:
    """What a generation cost: target forwards (prefill excluded), draft tokens proposed/accepted."""

    new_tokens: int = 0
    target_calls: int = 0
    rounds_with_draft: int = 0
    proposed: int = 0
    accepted: int = 0
    seconds: float = 0.0
    seconds_draft: float = 0.0
    seconds_target: float = 0.0
    seconds_prefill: float = 0.0
    ks: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens the target accepted."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.seconds_prefill

    def to_dict(self) -> dict:
        keys = ("new_tokens", "target_calls", "rounds_with_draft", "proposed", "accepted", "seconds",
                "seconds_draft", "seconds_target", "seconds_prefill")  # fmt: skip
        return {**{k: getattr(self, k) for k in keys}, "acceptance_rate": self.acceptance_rate,
                "tokens_per_call": self.tokens_per_call}  # fmt: skip


def _cut(tokens: list[int], budget: int, stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Emitted tokens up to the budget and through the first stop token; whether generation ends."""
    for i, t in enumerate(tokens[:budget]):
        if t in stop_ids:
            return tokens[: i + 1], True
    return tokens[:budget], len(tokens) >= budget


def speculative_generate(
    target: Runner,
    draft: Draft | None,
    prompt: Tensor,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    config: SpecConfig = SpecConfig(),
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> tuple[Tensor, SpecStats]:
    """Generate up to ``max_new_tokens`` after ``prompt`` (P,); ``draft=None`` is plain decoding.

    ``target`` must start empty; ``generator`` defaults to one seeded with ``sampling.seed``.
    Returns the new tokens (N,) and the accounting. Plain decoding runs through this same loop
    (one token per target forward), so the two time the same code.
    """
    _check_start(target, prompt, max_new_tokens)
    stats, stops = SpecStats(), frozenset(int(s) for s in stop_ids)
    if generator is None and not sampling.greedy:
        generator = sampling.generator(prompt.device)
    adapt = None
    if draft is not None:
        draft.rollback(0)  # a draft may hold state from an earlier generation
        adapt = AdaptiveK(config.costs or Costs(draft=draft.cost), k_min=config.k_min, k_max=config.k_max)
    t_start = time.perf_counter()
    # The target's cache holds every committed token but the last, which the next round feeds.
    if prompt.numel() > 1:
        target.feed(prompt[:-1], n_logits=1)  # the cache is what counts; skip the lm_head over the prompt
    stats.seconds_prefill = time.perf_counter() - t_start
    context = prompt.tolist()
    done = False
    while not done:
        budget = max_new_tokens - stats.new_tokens
        k = 0 if draft is None else min(_next_k(adapt, config, first=stats.target_calls == 0), budget - 1)
        proposal, t0 = None, time.perf_counter()
        if k > 0:
            proposal = draft.propose(torch.tensor(context, device=prompt.device), k, sampling, generator)
        t1 = time.perf_counter()
        drafted = proposal.tokens if proposal is not None else prompt.new_empty(0)
        logits = target.feed(torch.cat([prompt.new_tensor(context[-1:]), drafted]))  # (k'+1, V)
        t2 = time.perf_counter()
        n, nxt = _verify(drafted, proposal, logits, sampling, generator)
        target.crop(len(context) + n)  # keep the fed context, x_last and the accepted d_1..d_n
        emitted, done = _cut([*drafted[:n].tolist(), nxt], budget, stops)
        context += emitted
        if draft is not None:
            draft.rollback(len(context) - len(emitted) + min(n, len(emitted)))
            adapt.update(drafted.numel(), n)
        _account(stats, k=drafted.numel(), n=n, emitted=len(emitted), t_draft=t1 - t0, t_target=t2 - t1)
        if on_tokens is not None:
            on_tokens(emitted)
    stats.seconds = time.perf_counter() - t_start
    log.debug("speculative: %d tokens in %d target calls, acceptance %.2f",
              stats.new_tokens, stats.target_calls, stats.acceptance_rate)  # fmt: skip
    return torch.tensor(context[prompt.numel():], dtype=torch.long), stats


def _check_start(target: Runner, prompt: Tensor, max_new_tokens: int) -> None:
    if prompt.ndim != 1 or prompt.numel() < 1:
        raise SlimlmError(f"prompt must be a non-empty 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise SlimlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if target.length != 0:
        raise SlimlmError(f"the target's cache must start empty, it holds {target.length} tokens")


def _next_k(adapt: AdaptiveK, config: SpecConfig, *, first: bool) -> int:
    return adapt.next_k() if config.adaptive and not first else config.k


def _verify(drafted: Tensor, proposal, logits: Tensor, sampling: Sampling,
            generator: torch.Generator | None) -> tuple[int, int]:  # fmt: skip
    if sampling.greedy:
        return verify_greedy(drafted, logits)
    p = warped_probs(logits, sampling)  # (k+1, V)
    if drafted.numel() == 0:
        return 0, int(torch.multinomial(p[0], 1, generator=generator))
    q = proposal.probs if proposal.probs is not None else one_hot_probs(drafted, p.shape[-1])
    return verify_sampled(drafted, q, p, generator)


def _account(stats: SpecStats, *, k: int, n: int, emitted: int, t_draft: float, t_target: float) -> None:
    stats.target_calls += 1
    stats.rounds_with_draft += k > 0
    stats.proposed += k
    stats.accepted += n
    stats.new_tokens += emitted
    stats.seconds_draft += t_draft
    stats.seconds_target += t_target
    stats.ks.append(k)
