"""KV-cache eviction policies: which cached tokens to keep under a fixed budget.

Pure functions of cache length and attention scores; the cache classes in
:mod:`slimlm.generation.kv.evicting` apply them.

* **Window** keeps the ``budget`` most recent tokens. It is the baseline the
  StreamingLLM paper shows collapsing once the first tokens leave the cache.
* **Sinks** (StreamingLLM): Xiao, Tian, Chen, Han, Lewis. "Efficient Streaming
  Language Models with Attention Sinks", ICLR 2024 (arXiv:2309.17453). Keep
  the first ``sinks`` tokens (the "attention sinks" that soak up the softmax
  mass a query does not want to put anywhere) plus the most recent
  ``budget - sinks`` tokens. Positions are assigned *within the cache*: the
  token in slot ``i`` is rotated as position ``i`` and the next query takes
  position ``len(cache)``, so the model never sees a position beyond the
  budget, however long the stream (the paper, Sec. 3.2).
* **H2O**: Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett,
  Wang, Chen. "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
  Large Language Models", NeurIPS 2023 (arXiv:2306.14048). Keep the ``recent``
  most recent tokens plus the ``budget - recent`` older tokens with the largest
  attention accumulated over every query so far ("heavy hitters"), chosen per
  KV head. The evicted token's score is dropped with it; kept scores carry on.

Kept indices are returned ascending (stream order), so the in-cache position
of a kept token is its rank among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError


def _check_budget(budget: int, what: str) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise SlimlmError(f"{what} budget must be a positive int (tokens kept in the cache), got {budget!r}")


@dataclass(frozen=True)
class Window:
    """Keep the ``budget`` most recent tokens."""

    budget: int

    def __post_init__(self) -> None:
        _check_budget(self.budget, "window")


@dataclass(frozen=True)
class Sinks:
    """StreamingLLM: the first ``sinks`` tokens plus a recent window, ``budget`` in all."""

    budget: int
    sinks: int = 4

    def __post_init__(self) -> None:
        _check_budget(self.budget, "sinks")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise SlimlmError(f"sinks must be an int >= 0 (4 in the paper), got {self.sinks!r}")
        if self.budget < self.sinks + 1:
            raise SlimlmError(
                f"sinks budget {self.budget} must be at least sinks + 1 = {self.sinks + 1} "
                f"(the sink tokens plus a window of at least one recent token)"
            )


@dataclass(frozen=True)
class H2O:
    """Heavy hitters by accumulated attention plus ``recent`` recent tokens, ``budget`` in all.

    ``recent=None`` splits the budget in half as in the paper's default.
    """

    budget: int
    recent: int | None = None

    def __post_init__(self) -> None:
        _check_budget(self.budget, "h2o")
        if self.budget < 2:
            raise SlimlmError(f"h2o budget must be >= 2 (one heavy hitter and one recent token), got {self.budget}")
        if self.recent is not None and (
            isinstance(self.recent, bool) or not isinstance(self.recent, int) or not 1 <= self.recent < self.budget
        ):
            raise SlimlmError(f"h2o recent must be an int in [1, budget - 1 = {self.budget - 1}], got {self.recent!r}")

    @property
    def n_recent(self) -> int:
        return self.recent if self.recent is not None else self.budget // 2


Policy = Window | Sinks | H2O
POLICY_NAMES = ("full", "window", "sinks", "h2o")


def parse_policy(name: str, budget: int | None, *, sinks: int = 4, recent: int | None = None) -> Policy | None:
    """A policy by name (one of ``POLICY_NAMES``) -> the typed policy (``None`` for the full cache)."""
    if name == "full":
        return None
    if name not in POLICY_NAMES:
        raise SlimlmError(f"unknown KV policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    if budget is None:
        raise SlimlmError(f"KV policy {name!r} needs a budget (tokens kept in the cache)")
    if name == "window":
        return Window(budget)
    if name == "sinks":
        return Sinks(budget, sinks)
    return H2O(budget, recent)


# ---------------------------------------------------------------- which slots to keep


def window_keep(length: int, budget: int, *, device: torch.device | None = None) -> Tensor:
    """Slots kept by a recent window: ``(min(length, budget),)`` ascending."""
    return torch.arange(max(0, length - budget), length, device=device)


def sinks_keep(length: int, budget: int, sinks: int, *, device: torch.device | None = None) -> Tensor:
    """Slots kept by StreamingLLM: the first ``sinks`` and the last ``budget - sinks``, ascending."""
    if length <= budget:
        return torch.arange(length, device=device)
    head = torch.arange(sinks, device=device)
    tail = torch.arange(length - (budget - sinks), length, device=device)
    return torch.cat([head, tail])  # (budget,)


def h2o_keep(scores: Tensor, budget: int, recent: int) -> Tensor:
    """Slots kept by H2O, independently per row of ``scores``.

    ``scores (..., L)`` accumulated attention of each cached slot (one row per
    KV head). Returns ``(..., min(L, budget))`` ascending slot indices: the
    last ``recent`` slots plus the ``budget - recent`` highest-scoring older
    slots (ties to the older slot).
    """
    L = scores.shape[-1]
    if L <= budget:
        return torch.arange(L, device=scores.device).expand(*scores.shape[:-1], L)
    old = scores[..., : L - recent]  # (..., L - recent)
    # topk on a stable descending sort: equal scores keep the lower index first.
    order = torch.sort(old, dim=-1, descending=True, stable=True).indices  # (..., L - recent)
    heavy = order[..., : budget - recent]
    tail = torch.arange(L - recent, L, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.sort(torch.cat([heavy, tail], dim=-1), dim=-1).values  # (..., budget)


def keep_slots(policy: Policy, length: int, scores: Tensor | None = None) -> Tensor:
    """The slots ``policy`` keeps out of ``length`` cached ones.

    Window and Sinks return ``(n,)`` (the same slots for every head); H2O
    needs ``scores (..., length)`` and returns ``(..., n)``.
    """
    if isinstance(policy, Window):
        return window_keep(length, policy.budget)
    if isinstance(policy, Sinks):
        return sinks_keep(length, policy.budget, policy.sinks)
    if isinstance(policy, H2O):
        if scores is None or scores.shape[-1] != length:
            raise SlimlmError(f"H2O needs accumulated scores of shape (..., {length}) to choose the slots to keep")
        return h2o_keep(scores, policy.budget, policy.n_recent)
    raise SlimlmError(f"unknown KV policy {policy!r}; use Window, Sinks or H2O")
