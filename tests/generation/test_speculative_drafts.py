"""Every draft kind on tiny models: speculative greedy == plain greedy token for token; drafts' own invariants."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.generation.decoder import make_decoder
from slimlm.generation.speculative import DecoderRunner, ModelDraft, PromptLookupDraft, fit_vocab, shallow_view
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.generation.sampling import Sampling
from slimlm.generation.speculative import SpecConfig, speculative_generate
from slimlm.generation.speculative.run import measure_costs
from slimlm.models.adapters import num_layers
from slimlm.models.tiny import tiny_model
from slimlm.pipelines.drafts import decode_bytes, make_draft, model_draft
from tests.generation.conftest import varied_tiny

# A prompt that repeats itself, so prompt lookup finds n-gram matches.
PROMPT = [5, 17, 99, 230, 41, 8, 300, 77, 5, 17, 99, 230, 41]
N_NEW = 24


def _deeper(family: str, seed: int = 0):
    """A 4-layer varied tiny model, so a self-speculative draft can keep fewer layers than the target."""
    from transformers import AutoModelForCausalLM

    from slimlm.models.adapters import adapter_for_config
    from slimlm.models.tiny import tiny_config

    config = tiny_config(family)
    fields = {**config.to_dict(), adapter_for_config(config).n_layers_attr: 4}
    fields.pop("layer_types", None)  # rebuilt for 4 layers
    config = type(config)(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    model.config.tie_word_embeddings = False
    return model


def _spec(model, draft, *, k=3, adaptive=True, sampling=Sampling(), n=N_NEW, prompt=PROMPT):
    cfg = SpecConfig(k=k, adaptive=adaptive)
    return speculative_generate(DecoderRunner(model), draft, torch.tensor(prompt), max_new_tokens=n,
                                sampling=sampling, config=cfg)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])  # fast path (2) and the HF-forward path
@pytest.mark.parametrize("spec", ["lookup", "layers:2", "int8", "int4-g16", "bf16", "recipe:magnitude-50", "other-model"])
def test_speculative_greedy_equals_plain_greedy(family, spec):
    target = _deeper(family)
    plain = generate(make_decoder(target), [PROMPT], GenerationConfig(max_new_tokens=N_NEW))[0]
    if spec == "other-model":  # a smaller model of the family with the same vocabulary
        draft = model_draft(varied_tiny(family, seed=7), target, name="tiny")
    else:
        draft = make_draft(spec, target, None)
    for adaptive in (False, True):
        out, st = _spec(target, draft, adaptive=adaptive)
        assert out.tolist() == plain, f"{spec} adaptive={adaptive}"
        assert st.new_tokens == N_NEW and st.target_calls <= N_NEW
    if spec in ("int8", "bf16"):  # a close copy of the target: most drafts survive
        assert st.acceptance_rate > 0.5 and st.tokens_per_call > 1.5


def test_self_draft_in_sampling_mode_accepts_everything():
    """q computed by the draft and p by the target's verifying forward line up position by position:
    with the target as its own draft, p == q (up to rounding) and every token is accepted."""
    target = varied_tiny("llama")
    draft = model_draft(target, target, name="self")
    for sampling in (Sampling(temperature=1.0, seed=1), Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=2)):
        out, st = _spec(target, draft, k=4, adaptive=False, sampling=sampling, n=30)
        assert st.proposed > 0 and st.accepted == st.proposed, sampling
        assert st.tokens_per_call == pytest.approx(30 / st.target_calls) and st.target_calls <= 7


def test_sampling_is_reproducible_with_a_seed():
    target = varied_tiny("qwen2")
    draft = make_draft("int8", target, None)
    s = Sampling(temperature=1.0, seed=5)
    assert _spec(target, draft, sampling=s)[0].tolist() == _spec(target, draft, sampling=s)[0].tolist()


def test_shallow_view_shares_weights_and_leaves_the_target_alone():
    target = _deeper("llama")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    view = shallow_view(target, 2)
    assert num_layers(view.config) == 2 and num_layers(target.config) == 4
    assert len(view.model.layers) == 2 and len(target.model.layers) == 4
    assert view.model.layers[1] is target.model.layers[1] and view.lm_head is target.lm_head
    ids = torch.tensor([PROMPT])
    # The view computes exactly the first two blocks, the final norm and the head.
    h = target(ids, output_hidden_states=True).hidden_states[2]
    want = target.lm_head(target.model.norm(h))
    torch.testing.assert_close(view(ids).logits, want)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert decode_bytes(view) < decode_bytes(target)


@pytest.mark.parametrize("n", [0, 4, 9])
def test_shallow_view_refuses_a_bad_depth(n):
    with pytest.raises(SlimlmError, match="1 <= layers < 4"):
        shallow_view(_deeper("llama"), n)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    draft = PromptLookupDraft(max_ngram=2)
    ctx = torch.tensor([1, 2, 3, 4, 9, 1, 2, 7, 8, 5, 1, 2])
    assert draft.propose(ctx, 3, Sampling()).tokens.tolist() == [7, 8, 5]  # "1 2" last seen before "7 8 5"
    assert draft.propose(ctx, 10, Sampling()).tokens.tolist() == [7, 8, 5, 1, 2]  # up to the end of the context
    assert draft.propose(torch.tensor([1, 2, 3]), 3, Sampling()).tokens.numel() == 0  # no match
    assert draft.propose(torch.tensor([4, 6, 3, 6]), 2, Sampling()).tokens.tolist() == [3, 6]  # 1-gram fallback
    assert draft.propose(torch.tensor([7]), 2, Sampling()).tokens.numel() == 0
    with pytest.raises(SlimlmError, match="min_ngram"):
        PromptLookupDraft(max_ngram=1, min_ngram=2)


def test_model_draft_rolls_back_and_catches_up():
    """After a rollback the draft proposes exactly what a fresh draft proposes for the same context."""
    model = varied_tiny("llama")
    draft = model_draft(model, model, name="m")
    ctx = torch.tensor(PROMPT)
    first = draft.propose(ctx, 4, Sampling()).tokens
    assert draft.runner.length == ctx.numel() + 3  # the last proposed token is never fed
    ctx2 = torch.cat([ctx, first[:2], torch.tensor([11])])  # two accepted, then the target's own token
    draft.rollback(ctx.numel() + 2)
    again = draft.propose(ctx2, 4, Sampling()).tokens
    fresh = model_draft(model, model, name="m").propose(ctx2, 4, Sampling()).tokens
    assert again.tolist() == fresh.tolist()


def test_draft_vocabulary_is_fitted_to_the_target():
    """Padded vocabularies differ in size: extra draft ids are dropped, missing ones get probability 0."""
    target = varied_tiny("llama")
    draft = ModelDraft(DecoderRunner(tiny_model("llama", vocab_size=600)), vocab_size=512, name="big", cost=0.5)
    prop = draft.propose(torch.tensor(PROMPT), 3, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    assert prop.probs.shape == (3, 512) and torch.allclose(prop.probs.sum(-1), torch.ones(3))
    plain = generate(make_decoder(target), [PROMPT], GenerationConfig(max_new_tokens=N_NEW))[0]
    assert _spec(target, draft)[0].tolist() == plain
    padded = fit_vocab(torch.zeros(2, 300), 512)
    assert padded.shape == (2, 512) and torch.isinf(padded[:, 300:]).all() and (padded[:, :300] == 0).all()


def test_measure_costs_gives_a_usable_table():
    target = varied_tiny("llama")
    runner, draft = DecoderRunner(target), make_draft("lookup", target, None)
    costs = measure_costs(runner, draft, torch.tensor(PROMPT), k_max=4, reps=1)
    assert len(costs.verify) == 4 and all(v > 0 for v in costs.verify) and costs.draft < 0.5
    assert runner.length == 0  # left empty for the generation that follows


@pytest.mark.parametrize("spec, pattern", [
    ("layers:x", "expected a whole number"),
    ("layers:9", "1 <= layers < 4"),
    ("recipe:no-such-recipe", "no-such-recipe"),
    ("/no/such/model", "does not exist"),
])  # fmt: skip
def test_make_draft_refusals(spec, pattern):
    with pytest.raises(SlimlmError, match=pattern):
        make_draft(spec, _deeper("llama"), None)


def test_make_draft_refuses_a_different_tokenizer(tmp_path):
    from slimlm.models.tiny import save_tiny_model_dir, tiny_tokenizer

    other = save_tiny_model_dir(tmp_path / "other", "llama")
    with pytest.raises(SlimlmError, match="different tokenizer"):
        make_draft(str(other), varied_tiny("llama"), tiny_tokenizer(400))


@pytest.mark.real_model
def test_real_model_lookup_on_a_passage_it_rereads():
    """SmolLM2-135M re-reading a passage: prompt lookup drafts most tokens, greedy output unchanged."""
    from slimlm.data import protocol_texts
    from slimlm.models import load_model

    model, tok = load_model("smollm2-135m")
    passage = protocol_texts("wiki-v1").evaluation[1][:600]
    passage = passage[: passage.rfind(".") + 1]
    prompt = tok(passage + "\n\n" + passage[: passage.find(".") + 1]).input_ids
    plain = generate(make_decoder(model), [prompt], GenerationConfig(max_new_tokens=32))[0]
    out, st = speculative_generate(DecoderRunner(model), make_draft("lookup", model, tok), torch.tensor(prompt),
                                   max_new_tokens=32, config=SpecConfig(k=8, adaptive=False))  # fmt: skip
    assert out.tolist() == plain
    assert st.tokens_per_call > 3 and st.acceptance_rate > 0.6  # measured: 6.4 tokens per call, 77% accepted


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])  # sliding-window layers on the HF-forward path
@pytest.mark.parametrize("spec", ["lookup", "int8"])
def test_sliding_window_families_roll_back_past_the_window(family, spec):
    target = varied_tiny(family)  # window 32
    prompt = list(range(5, 45)) * 2  # 80 tokens: rollbacks happen past the window
    plain = generate(make_decoder(target), [prompt], GenerationConfig(max_new_tokens=30))[0]
    out, st = _spec(target, make_draft(spec, target, None), k=4, adaptive=False, n=30, prompt=prompt)
    assert out.tolist() == plain and st.proposed > 0
