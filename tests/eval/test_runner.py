import json

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.eval import Protocol, Result, evaluate, format_results, load_result, measure_size, measure_speed
from slimlm.models.size import bytes_read_per_token
from slimlm.models.tiny import tiny_model, tiny_tokenizer

SMALL = Protocol(name="pydoc-test", text="pydoc-v1", window=64, eval_tokens=256, prompt_tokens=16,
                 new_tokens=5, speed_runs=2, kl_top_k=32)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))


def test_size_counts_tied_weights_once_and_bits_per_weight():
    model = tiny_model("llama")  # tied embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    size = measure_size(model)
    assert size.params == sum(p.numel() for p in model.parameters())  # parameters() already dedupes
    naive = sum(p.numel() for p in model.state_dict().values())
    assert size.params < naive
    assert size.bits_per_weight == 32.0
    size16 = measure_size(model.to(torch.bfloat16))
    assert size16.bits_per_weight == 16.0 and size16.model_bytes * 2 == pytest.approx(size.model_bytes, rel=0.01)
    # one decode step reads every weight once; the tied table is read as the lm_head
    assert bytes_read_per_token(model) == size16.params * 2


def test_untied_embedding_is_indexed_not_read():
    model = tiny_model("mistral")
    emb = model.model.embed_tokens.weight
    full = sum(p.numel() * 4 for p in model.parameters())
    assert bytes_read_per_token(model) == full - emb.numel() * 4 + emb.shape[1] * 4


def test_speed_reports_consistent_numbers():
    model = tiny_model("llama")
    s = measure_speed(model, torch.arange(3, 19), new_tokens=6, runs=2)
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert 0 < s.latency_p50_ms <= s.latency_p95_ms
    assert s.prompt_tokens == 16 and s.new_tokens == 6 and s.threads == torch.get_num_threads()
    assert s.achieved_gb_per_s == pytest.approx(s.bytes_per_token * s.decode_tokens_per_s / 1e9)
    assert s.peak_rss_mb > 10


@pytest.mark.parametrize("family, loop", [("llama", "slimlm"), ("gpt2", "hf")])
def test_speed_times_slimlms_own_loop(monkeypatch, family, loop):
    """Decode speed is what `slimlm generate` runs: the fast decoder where the family allows it."""
    from slimlm.generation import FastDecoder, HFDecoder

    cls = FastDecoder if loop == "slimlm" else HFDecoder
    calls = []
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **kw: calls.append(a[0].shape) or forward(self, *a, **kw))
    s = measure_speed(tiny_model(family), torch.arange(3, 19), new_tokens=6, runs=2)
    assert s.loop == loop
    assert calls.count((1, 16)) == 3 and calls.count((1, 1)) == 3 * 5  # a warm-up and 2 timed runs of 5 steps


def test_evaluate_caches_base_outputs_and_compares(tmp_path):
    tok, base = tiny_tokenizer(), tiny_model("llama", seed=0)
    r0 = evaluate(base, tok, source="tiny", protocol=SMALL, model_id="tiny@0", speed=False)
    assert r0.quality.kld == 0.0 and r0.quality.top1_agreement == 1.0
    assert r0.quality.tokens == 256 and r0.quality.windows == 4
    assert list((tmp_path / "cache" / "base").glob("*.safetensors"))

    def must_not_load():
        raise AssertionError("base outputs should come from the cache")

    other = tiny_model("llama", seed=1)
    r1 = evaluate(other, tok, source="other", protocol=SMALL, model_id="other@1", base_source="tiny",
                  base_id="tiny@0", load_base=must_not_load, speed=True)
    assert r1.quality.kld > 0 and r1.base == "tiny" and r1.speed is not None
    again = evaluate(base, tok, source="tiny", protocol=SMALL, model_id="tiny@0", speed=False)
    assert again.quality.perplexity == pytest.approx(r0.quality.perplexity, rel=1e-9)
    assert again.quality.kld == pytest.approx(0.0, abs=1e-6)

    path = r1.save(tmp_path / "r1.json")
    assert load_result(path) == r1
    assert json.loads(path.read_text())["schema"] == "slimlm.result/1"
    with pytest.raises(SlimlmError, match="--overwrite"):
        r1.save(path)
    table = format_results([r0, r1])
    assert "perplexity" in table and "pydoc-test" in table and "%)" in table


def test_too_short_text_is_refused():
    with pytest.raises(SlimlmError, match="tokens"):
        evaluate(tiny_model("llama"), tiny_tokenizer(), source="tiny", protocol=SMALL, n_tokens=10**9, speed=False)


def test_result_json_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"hello": 1}')
    with pytest.raises(SlimlmError, match="not a slimlm result"):
        load_result(p)
    assert isinstance(Result, type)


def test_size_of_a_quantized_model_counts_packed_weights():
    from slimlm.api import apply
    from slimlm.quant import RTN

    dense = measure_size(tiny_model("llama"))
    model = tiny_model("llama")
    apply(model, RTN(scheme="int4-g16"))
    q = measure_size(model)
    assert q.params == dense.params  # the logical weights are all still there
    assert q.bits_per_weight == pytest.approx(4 + 32 / 16)  # int4 codes + fp16 scale and zero per 16
    saved = dense.linear_bytes - q.linear_bytes
    assert dense.model_bytes - q.model_bytes == saved
    assert bytes_read_per_token(model) == bytes_read_per_token(tiny_model("llama")) - saved


def test_results_on_different_texts_are_not_set_side_by_side(tmp_path):
    from slimlm.eval import with_user_text

    (tmp_path / "t.txt").write_text("\n\n".join(f"note {i}: " + "zebra lantern quartz " * 30 for i in range(6)))
    tok, model = tiny_tokenizer(), tiny_model("llama")
    user = with_user_text(SMALL, eval_data=str(tmp_path / "t.txt"))
    assert user.name.startswith("pydoc-test+text:") and user.window == SMALL.window
    r_user = evaluate(model, tok, source="tiny", protocol=user, speed=False)
    r_small = evaluate(model, tok, source="tiny", protocol=SMALL, speed=False)
    assert r_user.text_source == str(tmp_path / "t.txt") and r_user.quality.tokens == SMALL.eval_tokens
    assert "sha256" in format_results([r_user, r_user])
    with pytest.raises(SlimlmError, match="different protocols or texts"):
        format_results([r_small, r_user])
