import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from slimlm.errors import SlimlmError
from slimlm.generation.sampling import Sampling, filtered_logits, next_tokens, top_k_filter, top_p_filter

LOGITS = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)) * 3


def test_top_k_keeps_the_k_largest():
    out = top_k_filter(LOGITS, 7)
    kept = out.isfinite()
    assert kept.sum(-1).tolist() == [7] * 6
    assert torch.equal(kept, LOGITS >= LOGITS.topk(7).values[:, -1:])
    torch.testing.assert_close(out, TopKLogitsWarper(7)(None, LOGITS.clone()))
    assert torch.equal(top_k_filter(LOGITS, 1000), LOGITS)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    out = top_p_filter(LOGITS, p)
    probs = LOGITS.softmax(-1)
    for row in range(LOGITS.shape[0]):
        kept = out[row].isfinite()
        mass = probs[row][kept].sum()
        assert mass >= p
        # dropping the least likely kept token falls below p: the set is minimal
        assert mass - probs[row][kept].min() < p
        assert kept.all() or probs[row][kept].min() >= probs[row][~kept].max()
    torch.testing.assert_close(out, TopPLogitsWarper(p)(None, LOGITS.clone()))


def test_sampled_frequencies_follow_the_filtered_distribution():
    cfg = Sampling(temperature=0.7, top_k=20, top_p=0.9, seed=1)
    row = LOGITS[:1].expand(20000, -1)
    draws = next_tokens(row, cfg, cfg.generator())
    expected = filtered_logits(LOGITS[:1], cfg).softmax(-1)[0]
    freq = torch.bincount(draws, minlength=100).float() / len(draws)
    assert freq[expected == 0].sum() == 0  # filtered tokens never drawn
    assert (freq - expected).abs().max() < 0.02


def test_greedy_is_argmax_and_validation():
    assert torch.equal(next_tokens(LOGITS, Sampling()), LOGITS.argmax(-1))
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0)):
        with pytest.raises(SlimlmError):
            Sampling(**bad)
