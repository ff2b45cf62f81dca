"""Speculative sampling with k >= 2 drafted tokens and q != p: one round exactly, and a long run statistically.

The correctness statement of Leviathan, Kalman & Matias 2023 ("Fast Inference from Transformers
via Speculative Decoding") and Chen et al. 2023 ("Accelerating Large Language Model Decoding with
Speculative Sampling"): a round emits d_1..d_n plus one target token, and the round's output followed by
plain target sampling is distributed as plain target sampling. The exact test enumerates every
draft sequence and every pattern of acceptance coins for small vocabularies, runs the library's
``verify_sampled`` with the uniforms it draws scripted (just inside or just outside each
acceptance region) and reads the distribution of the token it resamples, so the probability of
every output of the round comes out analytically, with no sampling.

The statistical test runs the whole loop (real tiny draft and target, KV caches, rollback,
temperature + top-k + top-p) over a thousand tokens and checks every emitted token against the
target's exact warped distribution given the text before it.
"""

import itertools
import math
from collections import defaultdict

import copy

import pytest
import torch

from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative import verify as verify_module
from slimlm.generation.speculative import (DecoderRunner, ModelDraft, SpecConfig, speculative_generate,
                                           verify_sampled, warped_probs)
from tests.generation.conftest import varied_tiny

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


# ---------------------------------------------------------------- a long run with a real draft

SAMPLING = Sampling(temperature=1.2, top_k=16, top_p=0.9)


def _noisy_copy(model, scale: float, seed: int):
    """A draft close to the target: every weight perturbed by ``scale`` times its tensor's std."""
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    return draft


def _warped(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """(N, V) float64: the model's warped next-token distribution before each of ids[start:] (plain HF forward)."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0, start - 1:-1]
    return warped_probs(logits, SAMPLING).double()


def _pit(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Randomised probability integral transform of each token under p, with the vocabulary ordered by q / p.

    u = P(tokens ranked before x) + U * p(x) is exactly uniform on [0, 1) when x ~ p, independently
    at every position. Ranking by how much more the draft likes a token than the target does puts
    the typical speculative bug (too much or too little of the draft's taste) into a shift of u.
    """
    order = torch.sort(q / p.clamp_min(1e-300), dim=-1, descending=True, stable=True).indices  # (N, V)
    p_sorted = p.gather(-1, order)
    rank = (order == tokens[:, None]).long().argmax(-1, keepdim=True)  # (N, 1) where each token sits
    p_x = p_sorted.gather(-1, rank)[:, 0]
    assert bool((p_x > 0).all()), "a token outside the target's top-k / top-p support was emitted"
    below = p_sorted.cumsum(-1).gather(-1, rank)[:, 0] - p_x
    return below + torch.rand(tokens.numel(), generator=g, dtype=torch.float64) * p_x


@pytest.mark.parametrize("with_draft", [True, False], ids=["speculative", "plain"])
def test_a_long_run_samples_the_target_distribution(with_draft):
    target = varied_tiny("llama", seed=0)
    draft_model = _noisy_copy(target, 0.15, seed=5)
    us, accepted, proposed = [], 0, 0
    g = torch.Generator().manual_seed(123)
    for seed in range(5):  # 5 runs of 200 tokens (the tiny model has 256 positions)
        prompt = torch.randint(4, 512, (8,), generator=torch.Generator().manual_seed(seed))
        draft = ModelDraft(DecoderRunner(draft_model), vocab_size=512, name="noisy", cost=0.1) if with_draft else None
        out, st = speculative_generate(DecoderRunner(target), draft, prompt, max_new_tokens=200, sampling=SAMPLING,
                                       config=SpecConfig(k=4, adaptive=False),
                                       generator=torch.Generator().manual_seed(seed))
        accepted, proposed = accepted + st.accepted, proposed + st.proposed
        ids = torch.cat([prompt, out])
        us.append(_pit(_warped(target, ids, 8), _warped(draft_model, ids, 8), out, g))
    u = torch.cat(us)  # (1000,) i.i.d. uniform if every token followed the target's distribution
    n = u.numel()
    z = float((u.mean() - 0.5) / math.sqrt(1 / 12 / n))
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
    assert abs(z) < 4, f"mean of u {float(u.mean()):.3f}: {z:.1f} sigma from 1/2"
    assert chi2 < 9 + 6 * math.sqrt(18), f"chi-square {chi2:.1f} of u over 10 bins (9 degrees of freedom)"
    if with_draft:
        assert 0.3 < accepted / proposed < 0.8  # both verification branches ran, many rounds kept >= 2 tokens
