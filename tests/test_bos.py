"""BOS-correct evaluation and calibration (issue 13, item 0).

A tokenizer that starts every input with BOS gets windows, calibration
sequences, long-text streams and prompts that start with it; a tokenizer
without BOS (the built-in SmolLM2's) gets exactly what it always got.
"""

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from slimlm.cli import main
from slimlm.data import bos_id, calibration_batch, load_documents, prompt_ids, token_windows, tokenize_documents
from slimlm.errors import SlimlmError
from slimlm.eval import PROTOCOLS, check_comparable, evaluate, for_tokenizer, with_user_text
from slimlm.eval.longtext import score_stream, stream_tokens
from slimlm.eval.runner import _prompt, eval_tokens, eval_windows
from slimlm.fsutil import cache_dir
from slimlm.generation import make_decoder
from slimlm.generation import speculative
from slimlm.generation import stream as stream_mod
from slimlm.models.tiny import BOS_ID, save_tiny_model_dir, tiny_model, tiny_tokenizer
from slimlm.pipelines.compress import compress
from slimlm.pipelines.evaluate import evaluate_sources

DOCS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." * 3 for i in range(40)]


@pytest.fixture(scope="module")
def bos_tok():
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def plain_tok():
    return tiny_tokenizer()


def builtin_or_plain_tokenizer():
    """SmolLM2's own tokenizer when the built-in is converted on this machine, else the tiny one (no BOS)."""
    path = cache_dir() / "models" / "smollm2-135m"
    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else tiny_tokenizer()


def test_bos_id_is_the_tokenizers_own_choice(bos_tok, plain_tok):
    assert bos_id(bos_tok) == BOS_ID and bos_tok("x").input_ids[0] == BOS_ID
    assert plain_tok.bos_token_id == BOS_ID and bos_id(plain_tok) is None  # names a BOS, never adds it
    assert bos_id(bos_tok._tokenizer) is None  # a raw tokenizers.Tokenizer names no BOS
    assert bos_id(builtin_or_plain_tokenizer()) is None  # SmolLM2: <|im_start|> is bos_token, not added


def test_windows_start_with_bos_and_keep_their_length():
    stream = torch.arange(10, 110)  # (100,)
    w = token_windows(stream, window=10, n_tokens=30, bos=BOS_ID)
    assert w.shape == (3, 10) and (w[:, 0] == BOS_ID).all()
    assert torch.equal(w[:, 1:].reshape(-1), stream[:27])  # 9 text tokens each, disjoint, from the start
    assert token_windows(stream, window=10, bos=BOS_ID).shape == (11, 10)  # 100 // 9 whole windows
    with pytest.raises(SlimlmError, match="at least 2 tokens"):
        token_windows(stream, window=1, bos=BOS_ID)


def test_builtin_protocol_keeps_its_name_and_windows_without_bos():
    tok = builtin_or_plain_tokenizer()
    proto = for_tokenizer("wiki-v1", tok)
    assert proto == PROTOCOLS["wiki-v1"] and proto.name == "wiki-v1" and proto.bos is None
    stream = tokenize_documents(tok, DOCS * 20)
    windows = eval_windows(stream, proto, n_tokens=1024, full=False)
    assert torch.equal(windows, stream[:1024].view(2, 512))  # bit for bit the old windows


def test_bos_protocol_is_versioned_and_reverts_for_a_plain_tokenizer(bos_tok, plain_tok):
    proto = for_tokenizer("wiki-v1", bos_tok)
    assert (proto.name, proto.bos, proto.derived_from) == ("wiki-v1+bos", BOS_ID, "wiki-v1")
    assert for_tokenizer(proto, bos_tok) == proto and for_tokenizer(proto, plain_tok) == PROTOCOLS["wiki-v1"]


def test_calibration_sequences_start_with_bos(bos_tok, plain_tok):
    calib = calibration_batch(bos_tok, DOCS, n_samples=8, seq_len=32, seed=0)  # (8, 32)
    assert calib.shape == (8, 32) and (calib[:, 0] == BOS_ID).all()
    every = tokenize_documents(bos_tok, DOCS).unfold(0, 31, 1)  # every run of 31 text tokens
    assert all((every == row[1:]).all(dim=1).any() for row in calib)
    assert BOS_ID not in calibration_batch(plain_tok, DOCS, n_samples=8, seq_len=32, seed=0)[:, 0].tolist()


def _text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return str(path)


def test_perplexity_equals_hf_forward_on_bos_windows(bos_tok, tmp_path):
    """The independent check: HF's own loss on [BOS] + text windows cut in this test from tokenizer(text)."""
    model = tiny_model("llama", seed=1)
    path = _text_file(tmp_path)
    proto = dataclasses.replace(with_user_text("wiki-v1", eval_data=path), window=64, eval_tokens=256)
    result = evaluate(model, bos_tok, source="tiny", protocol=proto, speed=False)
    ids = bos_tok("\n\n".join(load_documents(path))).input_ids  # the tokenizer's own BOS, then the text
    assert ids[0] == BOS_ID
    text = ids[1:]
    losses = []
    for w in range(4):
        window = torch.tensor([[BOS_ID, *text[w * 63 : (w + 1) * 63]]])  # (1, 64)
        with torch.no_grad():
            losses.append(model(input_ids=window, labels=window).loss.item())  # BOS is never a label
    assert result.protocol == proto.name + "+bos"
    assert (result.quality.windows, result.quality.window) == (4, 64)
    assert result.quality.perplexity == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)


def test_results_with_and_without_bos_never_compare_or_share_a_cache(bos_tok, plain_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", seed=1)
    proto = dataclasses.replace(with_user_text("wiki-v1", eval_data=_text_file(tmp_path)), window=64, eval_tokens=128)
    with_bos = evaluate(model, bos_tok, source="tiny", protocol=proto, speed=False, model_id="tiny@1")
    plain = evaluate(model, plain_tok, source="tiny", protocol=proto, speed=False, model_id="tiny@1")
    assert plain.protocol == proto.name and with_bos.protocol == proto.name + "+bos"
    assert plain.quality.perplexity != with_bos.quality.perplexity
    assert len(list((tmp_path / "cache" / "base").glob("*.safetensors"))) == 2  # two keys, no stale reuse
    with pytest.raises(SlimlmError, match="different protocols"):
        check_comparable([plain, with_bos])


def test_long_text_stream_starts_with_bos_which_is_never_scored(bos_tok, plain_tok):
    ids = stream_tokens(bos_tok, 48, protocol="pydoc-v1")
    text = eval_tokens(bos_tok, "pydoc-v1")
    assert ids.shape == (48,) and ids[0] == BOS_ID and torch.equal(ids[1:], text[:47])
    assert torch.equal(stream_tokens(plain_tok, 48, protocol="pydoc-v1"), text[:48])
    model = tiny_model("llama", seed=1)
    score = score_stream(make_decoder(model), ids, None, chunk=16)
    with torch.no_grad():
        hf = model(input_ids=ids[None], labels=ids[None]).loss.item()  # targets: ids[1:]
    assert score.nll.shape == (47,) and score.nll.mean().item() == pytest.approx(hf, rel=1e-4)


def test_prompts_get_one_bos_even_from_a_chat_template(bos_tok, plain_tok, monkeypatch):
    assert prompt_ids(bos_tok, "hello") == bos_tok("hello").input_ids and prompt_ids(bos_tok, "hello")[0] == BOS_ID
    assert prompt_ids(bos_tok, "<s>hello") == bos_tok("hello").input_ids  # a template's own BOS is not doubled
    assert prompt_ids(plain_tok, "<s>hello") == plain_tok("<s>hello").input_ids  # no BOS added: left alone
    tok = tiny_tokenizer(add_bos=True)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    seen = []
    monkeypatch.setattr(stream_mod, "stream_text", lambda dec, tk, ids, cfg: seen.append(ids) or iter(()))
    list(stream_mod.generate_text(tiny_model("llama"), tok, "hello", chat=True, max_new_tokens=1, decoder=object()))
    assert seen == [tok("hello").input_ids] and seen[0].count(BOS_ID) == 1


def test_compress_on_a_bos_model_calibrates_and_measures_with_bos(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    src = str(save_tiny_model_dir(tmp_path / "tiny", family="llama", add_bos=True))
    report = compress(src, "gptq-int4-g64", out=tmp_path / "g", protocol="pydoc-v1", calib_samples=2, tokens=512,
                      speed=False)  # fmt: skip
    manifest = json.loads((tmp_path / "g" / "slimlm_manifest.json").read_text())
    assert manifest["calibration"] == {"protocol": "pydoc-v1", "samples": 2, "seq_len": 512, "seed": 0, "bos": True}
    assert report.base.protocol == report.compressed.protocol == "pydoc-v1+bos"
    assert report.compressed.quality.kld > 0 and report.summary().startswith("protocol pydoc-v1+bos")


def test_saved_results_join_only_measurements_with_the_same_bos(bos_tok, plain_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    src = str(save_tiny_model_dir(tmp_path / "tiny", family="llama", add_bos=True))
    model, path = tiny_model("llama"), _text_file(tmp_path)
    measure = dict(eval_data=path, tokens=512, speed=False)
    proto = with_user_text("wiki-v1", eval_data=path)
    evaluate(model, bos_tok, source=src, protocol=proto, n_tokens=512, speed=False).save(tmp_path / "bos.json")
    evaluate(model, plain_tok, source=src, protocol=proto, n_tokens=512, speed=False).save(tmp_path / "plain.json")
    joined = evaluate_sources([str(tmp_path / "bos.json"), src], **measure)
    assert [r.protocol for r in joined] == [proto.name + "+bos"] * 2
    with pytest.raises(SlimlmError, match="different protocols"):
        evaluate_sources([str(tmp_path / "plain.json"), src], **measure)


def test_speed_prompt_starts_with_bos_and_keeps_its_length(bos_tok):
    proto = for_tokenizer("wiki-v1", bos_tok)
    prompt = _prompt(torch.arange(10, 1000), proto)
    assert prompt.shape == (proto.prompt_tokens,) and prompt[:2].tolist() == [BOS_ID, 10]
    assert torch.equal(_prompt(torch.arange(10, 1000), PROTOCOLS["wiki-v1"]), torch.arange(10, 522))


def test_cli_speculative_chat_prompt_has_one_bos(tmp_path, monkeypatch):
    src = save_tiny_model_dir(tmp_path / "tiny", family="llama", add_bos=True)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(src)
    seen = []

    def fake_run(model, ids, *args, **kwargs):
        seen.append(list(ids))
        raise SlimlmError("stop here")

    monkeypatch.setattr(speculative, "run_speculative", fake_run)
    assert main(["generate", str(src), "hello", "--chat", "--draft", "lookup", "--max-new-tokens", "2"]) != 0
    assert seen == [tok("hello").input_ids] and seen[0].count(BOS_ID) == 1
