"""Speculative decoding maths and loop: verification rules, exact distributions, accounting, adaptive k.

The statistical tests run the real loop on table "models" (next-token logits a fixed function of the
last two tokens), so thousands of generations take well under a second.
"""

import math

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.generation.speculative.drafts import DraftProposal, ModelDraft
from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative import (
    AdaptiveK,
    Costs,
    SpecConfig,
    best_k,
    expected_tokens,
    speculative_generate,
    verify_greedy,
    verify_sampled,
    warped_probs,
)

V = 6


class TableRunner:
    """Next-token logits = table[(previous token, token)]: a second-order Markov "model" with a cache."""

    def __init__(self, table: torch.Tensor):
        self.table, self.tokens = table, []  # (V, V, V)

    @property
    def length(self):
        return len(self.tokens)

    def feed(self, tokens, *, n_logits=None):
        prev = ([self.tokens[-1]] if self.tokens else [0]) + tokens.tolist()[:-1]
        self.tokens += tokens.tolist()
        return self.table[torch.tensor(prev), tokens][-(n_logits or len(prev)):]  # (T or n_logits, V)

    def crop(self, length):
        assert 0 <= length <= self.length
        del self.tokens[length:]


def _table(seed, scale=1.5):
    return torch.randn(V, V, V, generator=torch.Generator().manual_seed(seed)) * scale


def _exact_two_tokens(table, prompt, sampling):
    """P(x1, x2 | prompt) of the table model under ``sampling``: (V, V)."""
    p1 = warped_probs(table[prompt[-2], prompt[-1]][None], sampling)[0]  # (V,)
    p2 = warped_probs(table[prompt[-1]], sampling)  # (V, V): row x1 = p(x2 | prompt[-1], x1)
    return p1[:, None] * p2


def _empirical_two_tokens(target_table, draft, prompt, sampling, *, n, k):
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    accepted = proposed = 0
    for _ in range(n):
        out, st = speculative_generate(TableRunner(target_table), draft, torch.tensor(prompt), max_new_tokens=2,
                                       sampling=sampling, config=SpecConfig(k=k, adaptive=False), generator=gen)
        counts[out[0], out[1]] += 1
        accepted, proposed = accepted + st.accepted, proposed + st.proposed
    return counts / n, accepted / max(proposed, 1)


def _check_distribution(freq, exact, n):
    """Total variation within twice its expectation under the null, Pearson chi-square within 6 sigma."""
    tv = 0.5 * (freq - exact).abs().sum()
    mean_tv = 0.5 * (2 * exact * (1 - exact) / (math.pi * n)).sqrt().sum()  # E|freq - p| of each cell, summed
    assert tv < 2 * mean_tv, f"total variation {tv:.4f}, expected about {mean_tv:.4f}"
    support = exact > 0
    assert (freq[~support] == 0).all(), "a token outside the target's support was emitted"
    chi2 = (n * (freq[support] - exact[support]) ** 2 / exact[support]).sum()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize("sampling, n", [(Sampling(temperature=1.0), 2500),
                                         (Sampling(temperature=0.7, top_k=4, top_p=0.9), 1500)],
                         ids=["t1", "t0.7-topk4-topp0.9"])  # fmt: skip
def test_speculative_sampling_keeps_the_target_distribution(sampling, n):
    target, draft_table, prompt = _table(0), _table(1), [2, 3]
    draft = ModelDraft(TableRunner(draft_table), vocab_size=V, name="table", cost=0.1)
    freq, acceptance = _empirical_two_tokens(target, draft, prompt, sampling, n=n, k=2)
    exact = _exact_two_tokens(target, prompt, sampling)
    _check_distribution(freq, exact, n)
    _check_distribution(freq.sum(1), exact.sum(1), n)  # first token
    _check_distribution(freq.sum(0), exact.sum(0), n)  # second-position marginal
    assert 0.1 < acceptance < 0.95  # the draft differs from the target: both branches ran


def test_deterministic_draft_keeps_the_target_distribution():
    """A draft without probabilities (prompt lookup) is q = one-hot: accept with p(d), else resample."""

    class Fixed:
        name, cost = "fixed", 0.0

        def propose(self, context, k, sampling, generator=None):
            return DraftProposal(torch.tensor([1, 4, 4][:k]))

        def rollback(self, length):
            pass

    n, sampling, target = 2000, Sampling(temperature=1.0), _table(2, scale=1.0)
    freq, acceptance = _empirical_two_tokens(target, Fixed(), [0, 1], sampling, n=n, k=2)
    _check_distribution(freq, _exact_two_tokens(target, [0, 1], sampling), n)
    assert 0.02 < acceptance < 0.9


def test_the_checker_rejects_a_wrong_distribution():
    """The same statistics catch a sampler that ignores the rejection rule (always accepts)."""
    sampling, target, draft_table, n = Sampling(temperature=1.0), _table(0), _table(1), 2500
    exact = _exact_two_tokens(target, [2, 3], sampling)
    wrong = _exact_two_tokens(draft_table, [2, 3], sampling)  # what always accepting the draft yields
    with pytest.raises(AssertionError):
        _check_distribution(wrong, exact, n)


def test_verify_sampled_with_q_equal_p_accepts_everything():
    p = torch.softmax(torch.randn(4, V, generator=torch.Generator().manual_seed(3)), -1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        d = torch.multinomial(p[:3], 1, generator=gen)[:, 0]
        assert verify_sampled(d, p[:3], p, gen)[0] == 3


def test_verify_sampled_never_resamples_the_rejected_token():
    p = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    q = torch.tensor([[0.0, 1.0, 0, 0, 0, 0]])  # p/q = 0.5 on token 1: rejected half the time
    gen = torch.Generator().manual_seed(0)
    results = [verify_sampled(torch.tensor([1]), q, p, gen) for _ in range(400)]
    rejected = [nxt for n, nxt in results if n == 0]
    assert rejected and set(rejected) == {0}  # residual max(0, p - q) puts all its mass on token 0
    assert all(nxt == 5 for n, nxt in results if n == 1)  # all accepted: the bonus token from p_2


def test_verify_greedy_longest_prefix_and_target_token():
    logits = torch.full((4, V), -1.0)
    for i, t in enumerate([3, 1, 4, 2]):
        logits[i, t] = 1.0  # the target's choices after each prefix: 3, 1, 4, then 2
    assert verify_greedy(torch.tensor([3, 1, 4]), logits) == (3, 2)
    assert verify_greedy(torch.tensor([3, 5, 4]), logits) == (1, 1)  # a later match does not count
    assert verify_greedy(torch.tensor([0, 1, 4]), logits) == (0, 3)
    assert verify_greedy(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 3)


class Oracle:
    """Knows the target's greedy continuation; gets the first ``good`` tokens of each proposal right."""

    name, cost = "oracle", 0.0

    def __init__(self, prompt_len, truth, good):
        self.prompt_len, self.truth, self.good = prompt_len, truth, good

    def propose(self, context, k, sampling, generator=None):
        at = context.numel() - self.prompt_len
        right = self.truth[at:at + k]
        return DraftProposal(torch.tensor([t if i < self.good else (t + 1) % V for i, t in enumerate(right)]))

    def rollback(self, length):
        pass


@pytest.mark.parametrize("good, k", [(2, 4), (4, 4), (0, 3)])
def test_accounting(good, k):
    target, prompt, n_new = _table(4), torch.tensor([1, 2, 3]), 30
    truth, plain = speculative_generate(TableRunner(target), None, prompt, max_new_tokens=n_new + k)
    draft = Oracle(3, truth.tolist(), good)
    out, st = speculative_generate(TableRunner(target), draft, prompt, max_new_tokens=n_new,
                                   config=SpecConfig(k=k, adaptive=False))
    assert out.tolist() == truth[:n_new].tolist()
    # Replay the schedule: each round drafts min(k, budget - 1) tokens and accepts min(good, drafted).
    made = calls = proposed = accepted = 0
    while made < n_new:
        d = min(k, n_new - made - 1)
        a = min(good, d)
        made, calls, proposed, accepted = made + min(a + 1, n_new - made), calls + 1, proposed + d, accepted + a
    assert (st.new_tokens, st.target_calls, st.proposed, st.accepted) == (n_new, calls, proposed, accepted)
    assert st.tokens_per_call == pytest.approx(n_new / calls)
    assert st.acceptance_rate == pytest.approx(accepted / proposed)
    assert plain.target_calls == n_new + k and plain.proposed == 0  # no draft: one token per call


def test_stop_token_ends_generation_inside_an_accepted_run():
    target, prompt = _table(5), torch.tensor([1, 2, 3])
    truth, _ = speculative_generate(TableRunner(target), None, prompt, max_new_tokens=20)
    stop = truth[5].item()
    first = truth.tolist().index(stop)
    out, _ = speculative_generate(TableRunner(target), Oracle(3, truth.tolist(), 8), prompt, max_new_tokens=20,
                                  stop_ids=[stop], config=SpecConfig(k=8, adaptive=False))
    assert out.tolist() == truth[: first + 1].tolist()


def test_expected_tokens_and_best_k():
    assert expected_tokens(0.0, 5) == 1 and expected_tokens(1.0, 5) == 6
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    free = Costs(draft=0.0, per_extra=0.0)
    assert best_k(0.9, free, k_max=8) == 8  # nothing to pay: draft as far as allowed
    dear = Costs(draft=0.5, verify=(1.8,) * 8)
    assert best_k(0.1, dear) == 0  # a poor draft is switched off
    assert best_k(0.95, dear) >= 4
    ks = [best_k(a, Costs(draft=0.2)) for a in (0.3, 0.6, 0.8, 0.95)]
    assert ks == sorted(ks)  # better acceptance, longer drafts


def test_costs_round_and_refusals():
    c = Costs(draft=0.5, verify=(1.5, 1.6), per_extra=0.1)
    assert c.round(0) == 1 and c.round(1) == pytest.approx(2.0) and c.round(4) == pytest.approx(2 + 1.6 + 0.2)
    with pytest.raises(SlimlmError, match="costs must be"):
        Costs(draft=-1)


def test_adaptive_k_tracks_acceptance_and_probes_a_switched_off_draft():
    ada = AdaptiveK(Costs(draft=0.3, verify=(1.2,) * 8), k_max=8, probe_after=2, max_probe_after=8)
    for _ in range(20):
        ada.update(4, 4)
    high = ada.next_k()
    for _ in range(30):
        ada.update(4, 0)
    assert ada.acceptance < 0.2 and ada.next_k() == 0 < high
    ks = []
    for _ in range(30):  # plain rounds; probes after 2, 4, 8, 8 idle rounds, all failing
        ks.append(ada.next_k())
        ada.update(ks[-1], 0)
    probe = best_k(ada.probe_acceptance, ada.costs, k_min=1)
    assert probe > 1 and ks[:26] == [0, 0, probe] + [0] * 4 + [probe] + ([0] * 8 + [probe]) * 2
    ks = []
    for _ in range(40):  # the probes succeed: the text became predictable
        ks.append(ada.next_k())
        ada.update(ks[-1], ks[-1])
    assert ada.acceptance > 0.9 and ks[-1] >= 7 and ks[-10:] == sorted(ks[-10:])


@pytest.mark.parametrize("kw, pattern", [
    (dict(k=0), "must be >= 1"),
    (dict(k=2, k_min=3, k_max=2), "0 <= k_min <= k_max"),
])  # fmt: skip
def test_config_refusals(kw, pattern):
    with pytest.raises(SlimlmError, match=pattern):
        SpecConfig(**kw)


def test_loop_refusals():
    runner = TableRunner(_table(0))
    with pytest.raises(SlimlmError, match="non-empty 1-D"):
        speculative_generate(runner, None, torch.tensor([], dtype=torch.long), max_new_tokens=3)
    with pytest.raises(SlimlmError, match="max_new_tokens"):
        speculative_generate(runner, None, torch.tensor([1]), max_new_tokens=0)
    runner.feed(torch.tensor([1, 2]))
    with pytest.raises(SlimlmError, match="start empty"):
        speculative_generate(runner, None, torch.tensor([1]), max_new_tokens=3)
