"""Speculative decoding, verification: the draft's tokens against the target's distributions.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (ICML);
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling".

In a round (:mod:`slimlm.generation.speculative.loop`) the draft proposed d_1..d_k with
d_i ~ q_i = q(. | x, d_<i), and one target forward gave p_1..p_{k+1}, p_i = p(. | x, d_<i).
Verification picks n, how many of d_1..d_k to keep, and one more token from the target.

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

import torch
from torch import Tensor

from slimlm.generation.sampling import Sampling, filtered_logits


def warped_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """(N, V) logits -> (N, V) float32 probabilities after temperature, top-k and top-p (as plain sampling)."""
    return filtered_logits(logits, sampling).softmax(-1)


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
