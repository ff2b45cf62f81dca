"""Next-token choice: greedy, temperature, top-k and nucleus (top-p) sampling.

Top-p is the nucleus rule of Holtzman et al. 2020 ("The Curious Case of
Neural Text Degeneration"): keep the smallest set of most likely tokens whose
probability sums to at least p. Filters apply in the order temperature,
top-k, top-p (the order of HF ``generate``), then one multinomial draw from a
seeded ``torch.Generator`` per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class Sampling:
    """How to pick each token: temperature 0 is greedy (top_k / top_p then unused)."""

    temperature: float = 0.0
    top_k: int | None = None  # None: no top-k filter
    top_p: float | None = None  # None or 1.0: no nucleus filter
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise SlimlmError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SlimlmError(f"top_k must be >= 1 (or None for no filter), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SlimlmError(f"top_p must be in (0, 1] (or None for no filter), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """(B, V) logits with all but the k largest per row set to -inf (ties at the k-th value kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """(B, V) logits keeping per row the smallest most-likely set with probability >= p (at least one token)."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    drop_sorted = before >= p  # the mass above already reaches p: not needed
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def filtered_logits(logits: Tensor, cfg: Sampling) -> Tensor:
    """(B, V) float32 logits after temperature, top-k and top-p: the distribution that is sampled."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    return logits


def next_tokens(logits: Tensor, cfg: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits of the last position -> (B,) chosen token ids."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
