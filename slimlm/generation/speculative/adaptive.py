"""Adaptive k for speculative decoding: how many tokens to draft per round.

Leviathan, Kalman & Matias 2023, section 3.4: at per-token acceptance ``a`` a round with k
drafted tokens emits ``E(a, k) = 1 + a + .. + a^k`` tokens and costs k draft tokens plus one
target forward over k + 1 tokens; the best k maximises ``E(a, k) / cost(k)``. ``a`` is estimated
online from the rounds so far.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError


def expected_tokens(a: float, k: int) -> float:
    """Tokens emitted per target forward at per-token acceptance ``a``: 1 + a + .. + a^k."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


@dataclass(frozen=True)
class Costs:
    """What a round costs, in target steps (a target forward over one token = 1).

    ``draft``: one drafted token. ``verify[j]``: a target forward over j + 2 tokens (the last
    context token and j + 1 drafts); past the table, each extra token adds ``per_extra``.
    The default assumes verification is nearly free (memory-bound decoding); measure the
    real table with ``slimlm.generation.speculative.run.measure_costs`` -- on a CPU with fp32
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
