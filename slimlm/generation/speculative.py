"""Speculative decoding: a cheap draft proposes k tokens, the target checks all of them in one forward.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (ICML);
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling".

One round, with committed context ``x`` whose last token the target has not read yet::

    draft:   d_1..d_k,  d_i ~ q_i = q(. | x, d_<i)           (k cheap forwards, or a lookup)
    target:  one forward over [x_last, d_1, .., d_k] -> p_1..p_{k+1},  p_i = p(. | x, d_<i)
    accept:  n = how many of d_1..d_k survive verification
    emit:    d_1..d_n and one more token from the target (so every round emits >= 1 token)

Decoding one token costs about one read of every weight, whatever the number of tokens in the
forward, so checking k+1 positions costs little more than generating one: each target forward
emits ``(1 - a^(k+1)) / (1 - a)`` tokens on average at per-token acceptance ``a``.

Greedy (temperature 0): d_i is accepted while it equals argmax p_i; the extra token is
argmax p_{n+1}. Every emitted token is the target's own argmax after the committed prefix, so
the output is the plain greedy output, token for token.

Sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw
the replacement from norm(max(0, p_i - q_i)) and stop; if all k survive draw d_{k+1} ~ p_{k+1}.
The emitted token at a position is distributed exactly as p:

    P(x) = q(x) min(1, p(x)/q(x)) + (1 - beta) max(0, p(x) - q(x)) / (1 - beta)
         = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x),        beta = sum_x min(p(x), q(x)).

Temperature, top-k and top-p are applied to p and q identically (``warped_probs``): the
theorem then holds for the warped target distribution, which is what plain sampling draws from.
A deterministic draft (prompt lookup) has q = one-hot(d): accept with probability p(d), else
resample from p with d removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling, filtered_logits

log = logging.getLogger("slimlm.generation")


def warped_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """(N, V) logits -> (N, V) float32 probabilities after temperature, top-k and top-p (as plain sampling)."""
    return filtered_logits(logits, sampling).softmax(-1)


# ---------------------------------------------------------------------------------------------
# Verification: pure functions of the draft tokens and the two models' distributions.
# ---------------------------------------------------------------------------------------------


def verify_greedy(draft: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """Longest prefix of ``draft`` (k,) that the target would have produced itself, plus its next token.

    ``target_logits`` (k+1, V): row i scores the position after the context and d_1..d_i.
    Returns (n accepted, the target's token after them).
    """
    k = draft.numel()
    choice = target_logits.argmax(-1)  # (k+1,) the target's greedy token after each draft prefix
    matched = (choice[:k] == draft).long().cumprod(0)  # (k,) 1 while every draft token so far matched
    n = int(matched.sum())
    return n, int(choice[n])


def verify_sampled(draft: Tensor, q: Tensor, p: Tensor, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Rejection-sample ``draft`` (k,) drawn from ``q`` (k, V) against the target's ``p`` (k+1, V).

    Returns (n accepted, the next token): d_1..d_n keep the target's distribution exactly, and
    the next token is the resample at the first rejection or a draw from p_{k+1}.
    """
    k = draft.numel()
    rows = torch.arange(k, device=draft.device)
    p_d, q_d = p[rows, draft], q[rows, draft]  # (k,) each; q_d > 0 since d_i was drawn from q_i
    r = torch.rand(k, generator=generator, device=p.device)  # one uniform per draft token
    rejected = (r * q_d >= p_d).nonzero()  # accept d_i  <=>  r < p_i(d_i) / q_i(d_i)
    n = int(rejected[0]) if rejected.numel() else k
    if n == k:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    residual = (p[n] - q[n]).clamp_min(0)  # (V,) the mass p has beyond q
    total = residual.sum()
    # p == q up to rounding: rejection had probability ~0 and the residual is empty; p is its limit.
    residual = residual / total if total > 1e-12 else p[n]
    return n, int(torch.multinomial(residual, 1, generator=generator))


def one_hot_probs(tokens: Tensor, vocab_size: int) -> Tensor:
    """q for a deterministic draft: (k,) tokens -> (k, V) one-hot rows."""
    return torch.nn.functional.one_hot(tokens, vocab_size).float()


# ---------------------------------------------------------------------------------------------
# Adaptive k (Leviathan et al. section 3.4: the expected speedup as a function of a, c and k).
# ---------------------------------------------------------------------------------------------


def expected_tokens(a: float, k: int) -> float:
    """Tokens emitted per target forward at per-token acceptance ``a``: 1 + a + .. + a^k."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


@dataclass(frozen=True)
class Costs:
    """What a round costs, in target steps (a target forward over one token = 1).

    ``draft``: one drafted token. ``verify[j]``: a target forward over j + 2 tokens (the last
    context token and j + 1 drafts); past the table, each extra token adds ``per_extra``.
    The default assumes verification is nearly free (memory-bound decoding); measure the
    real table with ``slimlm.generation.drafts.measure_costs`` -- on a CPU with fp32
    weights a 2-token forward can cost ~1.8 steps.
    """

    draft: float = 0.0
    verify: tuple[float, ...] = ()
    per_extra: float = 0.1

    def __post_init__(self) -> None:
        if self.draft < 0 or self.per_extra < 0 or any(not v > 0 for v in self.verify):
            raise SlimlmError(f"costs must be >= 0 (verify > 0), got draft={self.draft}, verify={self.verify}, "
                              f"per_extra={self.per_extra}")

    def round(self, k: int) -> float:
        """A round with k drafted tokens: k draft tokens and one target forward over k + 1 tokens."""
        if k == 0:
            return 1.0
        if k <= len(self.verify):
            return k * self.draft + self.verify[k - 1]
        last = self.verify[-1] if self.verify else 1.0
        return k * self.draft + last + self.per_extra * (k - len(self.verify))


def best_k(a: float, costs: Costs, *, k_min: int = 0, k_max: int = 8) -> int:
    """The k in k_min..k_max with the most tokens per unit time: E(a, k) / cost(k).

    k = 0 (a plain step, rate 1) wins when no k pays for its draft and verification.
    """
    return max(range(k_min, k_max + 1), key=lambda k: expected_tokens(a, k) / costs.round(k))


@dataclass
class AdaptiveK:
    """Running per-token acceptance (exponentially weighted counts) and the k it calls for.

    Each round is a geometric trial: n accepted tokens and, if n < k, one rejection. The
    estimate is accepted / (accepted + rejected) with one pseudo-count of each (a = 0.5
    prior). When no k pays (k = 0: plain steps), the draft is probed after ``probe_after``
    rounds without a proposal, with the k that would pay at acceptance ``probe_acceptance``;
    the wait doubles while probes fail (up to ``max_probe_after``) and resets once drafting
    pays again, so a passage the model starts copying is noticed within a few tokens.
    """

    costs: Costs
    k_min: int = 0
    k_max: int = 8
    decay: float = 0.9
    probe_after: int = 2
    max_probe_after: int = 32
    probe_acceptance: float = 0.95  # optimistic: a probe drafts the k a good draft earns, so one success shows it
    accepted: float = 1.0
    rejected: float = 1.0
    idle: int = 0
    wait: int = 0  # rounds without a proposal before the next probe (0: probe_after)

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            self.idle += 1
            return
        self.idle = 0
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (accepted < proposed)

    def next_k(self) -> int:
        k = best_k(self.acceptance, self.costs, k_min=self.k_min, k_max=self.k_max)
        if k > 0:
            self.wait = self.probe_after
            return k
        self.wait = self.wait or self.probe_after
        if self.idle < self.wait:
            return 0
        self.wait = min(2 * self.wait, self.max_probe_after)
        return max(1, best_k(self.probe_acceptance, self.costs, k_min=1, k_max=self.k_max))


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


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
    """Proposes tokens for the target to verify (see slimlm.generation.drafts)."""

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
