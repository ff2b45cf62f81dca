"""A factorized model on the generation loop, as a speculative draft, and through evaluate."""

import pytest
import torch

from slimlm.api import apply
from slimlm.eval import Protocol, evaluate
from slimlm.generation.decoder import FastDecoder, make_decoder
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.generation.speculative import DecoderRunner, SpecConfig, speculative_generate
from slimlm.lowrank import SVD, SVDLLM
from slimlm.models.size import measure_size
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import LowRankLinear
from slimlm.pipelines.drafts import decode_bytes, make_draft

IDS = torch.tensor([[5, 17, 99, 230, 41, 8, 300, 77, 12, 450, 64, 3]])  # (1, 12)
PROMPT = [5, 17, 99, 230, 41, 8, 300, 77, 5, 17, 99, 230, 41]
CALIB = torch.randint(3, 512, (8, 96), generator=torch.Generator().manual_seed(0))
SMALL = Protocol(name="pydoc-test", text="pydoc-v1", window=64, eval_tokens=256, prompt_tokens=16,
                 new_tokens=5, speed_runs=2, kl_top_k=32)  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])  # the fast decoder (2) and the HF-forward path
def test_decoder_runs_the_factors_and_matches_the_hf_forward(family):
    model = tiny_model(family)
    apply(model, SVD(params=0.3))
    dec = make_decoder(model)
    assert isinstance(dec, FastDecoder) == (family != "gpt2")
    cache = dec.new_cache(1, 32)
    pos = torch.arange(IDS.shape[1])[None]
    out = torch.cat([dec(IDS[:, a:b], pos[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 12))], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(out, model(IDS).logits, atol=2e-5, rtol=1e-4)


def test_factorized_draft_keeps_greedy_output_and_costs_less():
    target = tiny_model("llama")
    plain = generate(make_decoder(target), [PROMPT], GenerationConfig(max_new_tokens=16))[0]
    draft = make_draft("recipe:svd-20", target, None)
    assert any(isinstance(m, LowRankLinear) for m in draft.runner.decoder.model.modules())
    assert not any(isinstance(m, LowRankLinear) for m in target.modules())
    assert decode_bytes(draft.runner.decoder.model) < decode_bytes(target)
    out, st = speculative_generate(DecoderRunner(target), draft, torch.tensor(PROMPT), max_new_tokens=16,
                                   config=SpecConfig(k=3, adaptive=False))  # fmt: skip
    assert out.tolist() == plain and st.new_tokens == 16


def test_evaluate_measures_a_factorized_model():
    tok, base, model = tiny_tokenizer(), tiny_model("llama"), tiny_model("llama")
    apply(model, SVDLLM(params=0.4), CALIB)
    r = evaluate(model, tok, source="svd-llm", protocol=SMALL, base_source="tiny", load_base=lambda: base,
                 base_id="tiny@0", model_id="svd-llm@0")  # fmt: skip
    assert r.quality.kld > 0 and r.speed.decode_tokens_per_s > 0
    assert r.size.params < measure_size(base).params
    assert r.speed.bytes_per_token < measure_size(base).model_bytes
