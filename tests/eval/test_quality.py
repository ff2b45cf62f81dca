import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.eval.quality import kl_to_base, score_windows
from slimlm.models.tiny import tiny_model

V = 512


def _windows(n=3, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n, T), generator=g)


def test_uniform_model_has_perplexity_v():
    model = tiny_model("mistral", vocab_size=V)  # untied head: zeroing it leaves the body alone
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere -> uniform over V
    q, _ = score_windows(model, _windows())
    assert q.perplexity == pytest.approx(V, rel=1e-5)
    assert q.nll == pytest.approx(math.log(V), rel=1e-6)


def test_model_against_itself_has_zero_kl_and_full_agreement():
    model, w = tiny_model("llama"), _windows()
    q, stats = score_windows(model, w, collect_top_k=16)
    assert q.kld == 0.0 and q.top1_agreement == 1.0
    q2, _ = score_windows(model, w, base=stats)
    assert q2.kld == pytest.approx(0.0, abs=1e-6)
    assert q2.top1_agreement == 1.0
    assert q2.perplexity == pytest.approx(q.perplexity, rel=1e-6)
    assert stats.topk_idx.shape == (3, 31, 16) and stats.nll.shape == (3,)
    assert stats.perplexity == pytest.approx(q.perplexity, rel=1e-9)


def test_kl_with_full_topk_is_exact_and_truncation_is_a_close_lower_bound():
    g = torch.Generator().manual_seed(1)
    logp = F.log_softmax(torch.randn(40, V, generator=g) * 3, -1)
    logq = F.log_softmax(logp + 0.5 * torch.randn(40, V, generator=g), -1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    top_logp, top_idx = logp.topk(V, -1)
    assert torch.allclose(kl_to_base(logq, top_idx, top_logp), exact, atol=1e-5)
    top_logp, top_idx = logp.topk(64, -1)
    approx = kl_to_base(logq, top_idx, top_logp)
    assert (approx <= exact + 1e-5).all()
    assert approx.mean() > 0.8 * exact.mean()


def test_different_model_has_positive_kl_and_matches_exact_kl():
    base, other, w = tiny_model("llama", seed=0), tiny_model("llama", seed=0), _windows(n=2)
    with torch.no_grad():
        for p in other.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, stats = score_windows(base, w, collect_top_k=V)  # full vocabulary: exact KL
    q, _ = score_windows(other, w, base=stats)
    with torch.no_grad():
        lp = F.log_softmax(base(w).logits[:, :-1], -1)
        lq = F.log_softmax(other(w).logits[:, :-1], -1)
    exact = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert q.kld > 0 and q.kld == pytest.approx(exact, rel=1e-3)
    assert 0.0 <= q.top1_agreement <= 1.0
