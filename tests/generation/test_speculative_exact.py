"""Speculative sampling with k >= 2 drafted tokens and q != p: one round exactly, and a long run statistically.

The correctness statement (Leviathan, Kalman & Matias 2023, Theorem 1; Chen et al. 2023,
Theorem 1): a round emits d_1..d_n plus one target token, and the round's output followed by
plain target sampling is distributed as plain target sampling. The exact test enumerates every
draft sequence and every pattern of acceptance coins for small vocabularies, runs the library's
``verify_sampled`` with the uniforms it draws scripted (just inside or just outside each
acceptance region) and reads the distribution of the token it resamples, so the probability of
every output of the round comes out analytically, with no sampling.
"""

import itertools
import math
from collections import defaultdict

import pytest
import torch

from slimlm.generation.speculative import verify as verify_module
from slimlm.generation.speculative import verify_sampled

EDGE = 1e-9  # how far inside or outside an acceptance region a scripted uniform lies


class ScriptedTorch:
    """Stands in for ``torch`` inside verify.py: ``rand`` returns scripted uniforms, ``multinomial``
    records the weights it was asked to sample from and returns their argmax."""

    def __init__(self):
        self.uniforms: list[float] = []
        self.weights: torch.Tensor | None = None

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, size, generator=None, device=None):
        assert size == len(self.uniforms), "one uniform per draft token"
        return torch.tensor(self.uniforms, dtype=torch.float64, device=device)

    def multinomial(self, weights, num_samples, generator=None):
        assert self.weights is None, "a round draws exactly one token from the target side"
        assert num_samples == 1 and bool((weights >= 0).all()) and float(weights.sum()) > 0
        self.weights = weights.double() / weights.sum()
        return weights.argmax().view(1)


class Conditionals:
    """A next-token distribution for every token prefix: a fixed random function of the prefix.

    Some tokens get probability 0 (as after top-k / top-p), so p(d) = 0 and q(x) = 0 occur.
    ``one_hot`` makes a deterministic draft (prompt lookup: q is one-hot on its proposal).
    """

    def __init__(self, V: int, seed: int, *, one_hot: bool = False):
        self.V, self.seed, self.one_hot, self._rows = V, seed, one_hot, {}

    def __call__(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self._rows:
            index = sum(t * (self.V + 1) ** i for i, t in enumerate((*prefix, self.V)))  # injective code
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            logits = torch.randn(self.V, generator=g, dtype=torch.float64) * 1.5
            if self.one_hot:
                row = torch.nn.functional.one_hot(logits.argmax(), self.V).double()
            else:
                drop = torch.rand(self.V, generator=g) < 0.3
                drop[logits.argmax()] = False  # at least one token stays
                row = logits.masked_fill(drop, -math.inf).softmax(-1)
            self._rows[prefix] = row
        return self._rows[prefix]


def _uniforms(accept: tuple[bool, ...], a: list[float]) -> list[float]:
    """Uniforms that land just inside [0, a_i) (accept) or just outside it (reject)."""
    return [a_i * (1 - EDGE) if acc else a_i + (1 - a_i) * EDGE for acc, a_i in zip(accept, a)]


def round_distribution(p, q, k: int, V: int, scripted: ScriptedTorch) -> dict[tuple[int, ...], float]:
    """P(one round emits exactly this sequence) for context-free conditionals ``p``, ``q`` (prefix -> (V,))."""
    out: dict[tuple[int, ...], float] = defaultdict(float)
    for d in itertools.product(range(V), repeat=k):
        q_rows = torch.stack([q(d[:i]) for i in range(k)])  # (k, V): q_i = q(. | d_<i)
        p_rows = torch.stack([p(d[:i]) for i in range(k + 1)])  # (k+1, V): p_i = p(. | d_<i)
        q_d = q_rows[torch.arange(k), torch.tensor(d)]  # (k,)
        if bool((q_d == 0).any()):
            continue  # the draft never proposes d
        p_d = p_rows[torch.arange(k), torch.tensor(d)]
        a = (p_d / q_d).clamp(max=1).tolist()  # acceptance probability of each draft token
        for accept in itertools.product((True, False), repeat=k):  # every coin, also after a rejection
            weight = math.prod(a_i if acc else 1 - a_i for acc, a_i in zip(accept, a))
            if weight == 0:
                continue
            scripted.uniforms, scripted.weights = _uniforms(accept, a), None
            n, nxt = verify_sampled(torch.tensor(d), q_rows, p_rows)
            assert scripted.weights is not None and nxt == int(scripted.weights.argmax())
            for x, w in enumerate(scripted.weights.tolist()):
                if w > 0:
                    out[(*d[:n], x)] += float(q_d.prod()) * weight * w
    return out


def then_target(round_probs: dict, p, length: int, V: int) -> torch.Tensor:
    """P(first ``length`` tokens) when the round's output is followed by plain sampling from ``p``."""
    total = torch.zeros((V,) * length, dtype=torch.float64)
    for y in itertools.product(range(V), repeat=length):
        for cut in range(1, length + 1):
            head = round_probs.get(y[:cut], 0.0)
            if head:
                total[y] += head * math.prod(float(p(y[:j])[y[j]]) for j in range(cut, length))
    return total


def target_only(p, length: int, V: int) -> torch.Tensor:
    """P(first ``length`` tokens) under plain sampling from ``p``: the product of its conditionals."""
    total = torch.zeros((V,) * length, dtype=torch.float64)
    for y in itertools.product(range(V), repeat=length):
        total[y] = math.prod(float(p(y[:j])[y[j]]) for j in range(length))
    return total


@pytest.mark.parametrize("k, V", [(2, 5), (3, 4), (4, 3)])
@pytest.mark.parametrize("draft", ["model", "lookup"])
def test_one_round_then_the_target_is_the_target_exactly(monkeypatch, k, V, draft):
    scripted = ScriptedTorch()
    monkeypatch.setattr(verify_module, "torch", scripted)
    p = Conditionals(V, seed=10 * k)
    q = Conditionals(V, seed=10 * k + 1, one_hot=draft == "lookup")
    probs = round_distribution(p, q, k, V, scripted)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    assert {len(y) for y in probs} == set(range(1, k + 2))  # every number of accepted tokens happens
    got, want = then_target(probs, p, k + 1, V), target_only(p, k + 1, V)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), f"largest error {(got - want).abs().max():.2e}"
