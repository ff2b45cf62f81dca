import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.eval.longtext import kind_name, score_stream
from slimlm.generation.decoder import HFDecoder, make_decoder
from slimlm.generation.kv.policies import H2O, Sinks, Window
from slimlm.generation.kv.quant import KIVI
from slimlm.models.tiny import tiny_model

N = 80
IDS = torch.randint(4, 500, (N,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def full_nll(model):
    with torch.no_grad():
        logits = model(IDS[None]).logits[0, :-1]  # (N-1, V): the HF forward, one pass
    return -F.log_softmax(logits, -1).gather(-1, IDS[1:, None]).squeeze(-1).double()


def test_full_cache_scores_every_token_like_one_forward(model, full_nll):
    s = score_stream(make_decoder(model), IDS, None, chunk=16)
    assert s.nll.shape == (N - 1,) and torch.allclose(s.nll, full_nll, atol=1e-4)
    assert s.perplexity == pytest.approx(math.exp(full_nll.mean().item()), rel=1e-5)
    assert s.cache_bytes == make_decoder(model).cache_spec().bytes_per_token() * N


@pytest.mark.parametrize("kind", [Sinks(128, 4), Window(128), H2O(128)])
def test_a_budget_larger_than_the_stream_scores_like_the_full_cache(model, full_nll, kind):
    assert torch.allclose(score_stream(make_decoder(model), IDS, kind).nll, full_nll, atol=1e-4)


def test_evicting_policies_score_past_the_budget_and_hold_their_budget(model, full_nll):
    dec = make_decoder(model)
    s = score_stream(dec, IDS, Sinks(16, 4))
    assert torch.allclose(s.nll[:15], full_nll[:15], atol=1e-4)  # before anything is evicted
    assert not torch.allclose(s.nll[16:], full_nll[16:], atol=1e-3)
    assert s.cache_bytes == dec.cache_spec().bytes_per_token() * 16
    assert s.perplexity_from(16) == pytest.approx(math.exp(s.nll[15:].mean().item()))


def test_kivi_scores_the_same_in_chunks_as_token_by_token(model, full_nll):
    q = KIVI(4, group=8, residual=16)
    one = score_stream(make_decoder(model), IDS, q, chunk=1)
    assert torch.allclose(one.nll, score_stream(make_decoder(model), IDS, q, chunk=24).nll, atol=1e-5)
    assert one.cache_bytes < 0.5 * make_decoder(model).cache_spec().bytes_per_token() * N
    assert abs(one.perplexity / math.exp(full_nll.mean().item()) - 1) < 0.05


def test_names_and_refusals(model):
    assert kind_name(Sinks(512)) == "sinks(4)+window b=512" and kind_name(None) == "full"
    assert kind_name(KIVI(8)) == "kivi int8 g32 r128"
    with pytest.raises(SlimlmError, match="needs the fast decoder"):
        score_stream(HFDecoder(model), IDS, Sinks(16))
    with pytest.raises(SlimlmError, match="at least 2 tokens"):
        score_stream(make_decoder(model), IDS[:1], None)


def test_recompute_with_a_window_larger_than_the_stream_is_the_full_cache(model, full_nll):
    from slimlm.eval.longtext import score_recompute

    dec = make_decoder(model)
    assert torch.allclose(score_recompute(dec, IDS, 128, stride=16).nll, full_nll, atol=1e-4)
    # stride 1: every token re-encodes its last 16 tokens; a wider stride sees 12..16 of them
    s1, s4 = score_recompute(dec, IDS, 16, stride=1), score_recompute(dec, IDS, 16, stride=4)
    assert torch.allclose(s1.nll[:15], full_nll[:15], atol=1e-4)
    with torch.no_grad():  # token 40 predicted from tokens 24..39 alone, at positions 0..15
        logits = model(IDS[None, 24:40]).logits[0, -1]
    assert s1.nll[39].item() == pytest.approx(-torch.log_softmax(logits, -1)[IDS[40]].item(), abs=1e-4)
    assert not torch.allclose(s1.nll, s4.nll, atol=1e-3)
    with pytest.raises(SlimlmError, match="stride must be in"):
        score_recompute(dec, IDS, 16, stride=17)


@pytest.mark.real_model
def test_streamingllm_finding_on_the_real_model():
    """Window-only collapses once the first tokens leave; sinks + window stays with re-computation."""
    from slimlm.eval.longtext import score_recompute, stream_tokens
    from slimlm.models import load_model

    model, tok = load_model("smollm2-135m")
    dec, ids = make_decoder(model), stream_tokens(tok, 160)
    full = score_stream(dec, ids, None)
    window, sinks = score_stream(dec, ids, Window(16)), score_stream(dec, ids, Sinks(16, 4))
    recompute = score_recompute(dec, ids, 16, stride=2)
    past = [s.perplexity_from(16) for s in (full, window, sinks, recompute)]
    assert past[0] < past[2] < 1.15 * past[3]  # sinks: no worse than re-encoding the last 14-16 tokens
    assert past[1] > 2 * past[2]  # the window collapses
