"""slimlm.data: markup stripping, sources, locked splits, windows, calibration."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import sys

import pytest
import torch

from slimlm.data import (PROTOCOL_TEXTS, Split, calibration_batch, load_documents, parse_hf_spec,
                         protocol_texts, split_documents, strip_wikitext, token_windows,
                         tokenize_documents, wiki_articles)
from slimlm.data import splits as splits_mod
from slimlm.data import wiki as wiki_mod
from slimlm.errors import SlimlmError


# ---------------------------------------------------------------- fixtures

def _byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64)


@pytest.fixture(scope="module")
def byte_tok():
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """Parse the gensim dump once, into a private cache directory."""
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim is not installed")
    cache = tmp_path_factory.mktemp("slimlm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMLM_CACHE", str(cache))
        articles = wiki_articles()
    return cache, articles


# ---------------------------------------------------------------- markup

def test_strip_wikitext_representative_snippets():
    raw = (
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}\n"
        "'''Ada''' was a [[mathematician|Mathematician]] from [[London]].<ref>Cite, p. 3.</ref>"
        "<ref name=\"a\"/> She wrote ''Notes''.<!-- hidden -->\n"
        "== Early life ==\n"
        "Born in [[England]]{{citation needed|date=May 2015}}, she &amp; her mother "
        "lived at [http://example.org Ockham Park] <br/>and [http://bare.example].\n"
        "[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]] by [[Artist]]]]\n"
        "{| class=\"wikitable\"\n|-\n| cell {{tmpl|x}} || cell2\n|}\n"
        "* First item with <small>small</small> text\n"
        "# Second item\n"
        "[[Category:Mathematicians]]\n[[fr:Ada Lovelace]]\n"
        "== References ==\n{{reflist}}\n* Smith, J. A book.\n"
    )
    text = strip_wikitext(raw)
    assert text.startswith("Ada was a Mathematician from London. She wrote Notes.")
    assert "Early life\nBorn in England, she & her mother lived at Ockham Park" in text
    assert "First item with small text\nSecond item" in text
    for gone in ("{{", "}}", "[[", "]]", "<ref", "''", "==", "Infobox", "citation needed",
                 "Portrait", "cell", "Category", "fr:", "References", "Smith", "hidden", "http", "<"):
        assert gone not in text, gone


def test_strip_wikitext_nesting_and_unbalanced_markup():
    # a template inside a table inside a template, and "|}}" closing a template parameter
    assert strip_wikitext("a {{x|\n{| \n| {{y}} \n|}\n}} b {{z|p=|}} c") == "a b c"
    # an unclosed template drops only its own paragraph
    assert strip_wikitext("Keep this.\n\n{{broken|x\nlost\n\nAnd this.") == "Keep this.\n\nAnd this."
    # pipe trick, leading-colon link, stray closer
    assert strip_wikitext("[[Paris (France)|]] and [[:Category:Cities|cities]] }}") == "Paris and cities"
    # natural brackets and punctuation survive
    assert strip_wikitext('He said "[the] end" (1900).') == 'He said "[the] end" (1900).'


# ---------------------------------------------------------------- wiki

def test_wiki_articles_parse_plausible_text(wiki):
    cache, articles = wiki
    assert 95 <= len(articles) <= 115
    assert articles[0].title == "Anarchism"
    assert all(a.text for a in articles)
    text = "\n".join(a.text for a in articles)
    assert len(text) > 2_000_000
    for markup in ("{{", "[[", "<ref", "'''", "{|", "&amp;"):
        assert markup not in text, markup
    assert "Anarchism is a political philosophy" in text  # case and punctuation kept
    assert list((cache / "text").glob("wiki-*.json")), "parse result was not cached"


def test_wiki_articles_read_from_cache(wiki, monkeypatch):
    cache, articles = wiki
    monkeypatch.setenv("SLIMLM_CACHE", str(cache))
    monkeypatch.setattr(wiki_mod, "parse_wiki_dump", lambda path: pytest.fail("parsed again"))
    assert wiki_articles() == articles


def test_wiki_corrupt_cache_is_reparsed(wiki, tmp_path, monkeypatch):
    _, articles = wiki
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    path = wiki_mod._cache_path(wiki_mod.wiki_dump_path())
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert wiki_articles() == articles
    assert json.loads(path.read_text())["articles"][0]["title"] == "Anarchism"


def test_wiki_without_gensim_names_the_fix(monkeypatch):
    monkeypatch.setattr(wiki_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SlimlmError, match=r"pip install gensim.*pydoc"):
        load_documents("wiki")


# ---------------------------------------------------------------- splits

def _check_split(docs: list[str], split: Split) -> None:
    assert split.calibration and split.evaluation
    assert set(split.calibration).isdisjoint(split.evaluation)
    assert sorted(split.calibration + split.evaluation) == sorted(docs)
    # original order kept within each side
    order = {d: i for i, d in enumerate(docs)}
    for side in (split.calibration, split.evaluation):
        assert [order[d] for d in side] == sorted(order[d] for d in side)


def test_split_is_disjoint_complete_deterministic_and_seeded():
    docs = [f"document number {i}" for i in range(200)]
    a = split_documents(docs)
    _check_split(docs, a)
    assert a == split_documents(list(docs))
    assert 0.15 < len(a.evaluation) / len(docs) < 0.35
    b = split_documents(docs, seed=1)
    _check_split(docs, b)
    assert b.evaluation != a.evaluation


def test_split_hash_is_locked():
    # The protocol's split must not change between machines, runs or versions.
    assert splits_mod._unit_hash(0, "0\x00abc") == 0.976886369690971
    assert split_documents(["a", "b", "c", "d", "e", "f", "g", "h"]).evaluation == ["g", "h"]
    # with keys, the assignment depends on the keys only, not on the texts
    keys = [f"title {i}" for i in range(40)]
    a = split_documents([f"text {i}" for i in range(40)], keys=keys)
    b = split_documents([f"revised text {i}" for i in range(40)], keys=keys)
    assert [d.split()[-1] for d in a.evaluation] == [d.split()[-1] for d in b.evaluation]
    with pytest.raises(SlimlmError, match="unique and one per document"):
        split_documents(["a", "b"], keys=["k", "k"])


def test_wiki_v1_evaluation_articles_are_locked(wiki, monkeypatch):
    # wiki-v1 hashes article titles: stripper refinements cannot move an article across.
    monkeypatch.setenv("SLIMLM_CACHE", str(wiki[0]))
    title = {a.text: a.title for a in wiki[1]}
    evaluation = [title[t] for t in protocol_texts("wiki-v1").evaluation]
    assert len(evaluation) == 29
    assert evaluation[:3] == ["List of Atlas Shrugged characters", "Agricultural science", "Alchemy"]
    assert hashlib.sha256("\n".join(evaluation).encode()).hexdigest() == \
        "6277ca5b28abc886bf7ee4472d2c2f6dde237693b95cc9b2cf72b4a24cb7a0d4"


@pytest.mark.parametrize("seed", range(6))
def test_split_of_few_documents_keeps_both_sides(seed):
    for docs in (["x", "y"], ["x", "y", "z"]):
        _check_split(docs, split_documents(docs, seed=seed))
    _check_split(["p", "q", "r"], split_documents(["p", "q", "r"], eval_fraction=0.99, seed=seed))


def test_split_refuses_bad_input():
    with pytest.raises(SlimlmError, match="at least 2 documents"):
        split_documents(["only one"])
    with pytest.raises(SlimlmError, match="between 0 and 1"):
        split_documents(["a", "b"], eval_fraction=1.0)


def test_protocol_texts_wiki_and_pydoc(wiki, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(wiki[0]))
    split = protocol_texts("wiki-v1")
    _check_split([a.text for a in wiki[1]], split)
    assert sum(map(len, split.evaluation)) > 300_000  # well over 16,384 tokens
    pydoc = protocol_texts("pydoc-v1")
    assert pydoc.calibration and pydoc.evaluation
    assert set(PROTOCOL_TEXTS) >= {"wiki-v1", "pydoc-v1"}


def test_unknown_protocol_lists_valid_names():
    with pytest.raises(SlimlmError, match="unknown text protocol 'wiki-v9'.*wiki-v1.*pydoc-v1"):
        protocol_texts("wiki-v9")


# ---------------------------------------------------------------- tokens

def test_tokenize_documents_joins_once_without_length_warning(byte_tok):
    docs = ["Hello world.", "Second document, longer than the 64-token model max length. " * 3]
    ids = tokenize_documents(byte_tok, docs)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() == len("\n\n".join(docs).encode())
    assert byte_tok.decode(ids.tolist()) == "\n\n".join(docs)
    assert not byte_tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    assert tokenize_documents(byte_tok._tokenizer, docs).tolist() == ids.tolist()  # raw tokenizers.Tokenizer


def test_token_windows_shape_disjoint_and_exact_coverage():
    tokens = torch.arange(1000)
    w = token_windows(tokens, window=100, n_tokens=300)
    assert w.shape == (3, 100)
    assert torch.equal(w.flatten(), tokens[:300])  # disjoint, in order, exactly the first 300
    assert token_windows(tokens, window=128).shape == (7, 128)  # whole windows that fit
    assert token_windows(tokens, window=100, n_tokens=250).shape == (3, 100)  # rounded up
    assert token_windows(tokens, window=100, n_tokens=1000).shape == (10, 100)


def test_token_windows_too_short_says_what_is_available():
    with pytest.raises(SlimlmError, match=r"only 1,000 tokens.*2,048 requested.*--tokens N with N <= 512.*--full"):
        token_windows(torch.arange(1000), window=512, n_tokens=2048)
    with pytest.raises(SlimlmError, match=r"only 5,000 tokens \(9 whole windows.*N <= 4,608"):
        token_windows(torch.arange(5000), window=512, n_tokens=16_384)
    with pytest.raises(SlimlmError, match="only 10 tokens"):
        token_windows(torch.arange(10), window=512)
    with pytest.raises(SlimlmError, match="positive"):
        token_windows(torch.arange(10), window=0)


def test_calibration_batch_is_seeded_and_cut_from_the_stream(byte_tok):
    docs = load_documents("pydoc")[:20]
    stream = tokenize_documents(byte_tok, docs)
    a = calibration_batch(byte_tok, docs, n_samples=16, seq_len=64, seed=0)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_batch(byte_tok, docs, n_samples=16, seq_len=64, seed=0))
    assert not torch.equal(a, calibration_batch(byte_tok, docs, n_samples=16, seq_len=64, seed=1))
    windows = stream.unfold(0, 64, 1)  # (n - 63, 64): every contiguous window
    for row in a:
        assert (windows == row).all(dim=1).any()


def test_calibration_batch_refuses_short_text(byte_tok):
    with pytest.raises(SlimlmError, match="only 5 tokens, fewer than one sequence of 512"):
        calibration_batch(byte_tok, ["short"], seq_len=512)


# ---------------------------------------------------------------- sources

def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("First paragraph,\nstill first.\n\n  \nSecond one.\n\n\nThird.\n")
    assert load_documents(str(txt)) == ["First paragraph,\nstill first.", "Second one.", "Third."]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": "  "}\n')
    assert load_documents(str(jsonl)) == ["one", "two"]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2 is not valid JSON"),
    ('{"body": "x"}', r'line 2 has no "text" field'),
    ('["text"]', r'line 2 has no "text" field'),
    ('{"text": 3}', r'line 2: "text" is int'),
])
def test_bad_jsonl_line_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SlimlmError, match=message):
        load_documents(str(path))


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(SlimlmError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(SlimlmError, match=r"unknown text source 'wikipedia'; valid: wiki, pydoc, hf:"):
        load_documents("wikipedia")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SlimlmError, match="holds no text"):
        load_documents(str(empty))
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SlimlmError, match="not UTF-8"):
        load_documents(str(binary))


def test_pydoc_source_is_python_help_text():
    docs = load_documents("pydoc")
    assert len(docs) > 50 and any("assignment" in d.lower() for d in docs)


def test_parse_hf_spec():
    assert parse_hf_spec("wikitext:wikitext-2-raw-v1:test") == \
        parse_hf_spec("wikitext:wikitext-2-raw-v1:test:text")
    spec = parse_hf_spec("org/ds::train[:100]:body")
    assert (spec.path, spec.config, spec.split, spec.column) == ("org/ds", None, "train[:100]", "body")
    spec = parse_hf_spec("org/ds:validation")
    assert (spec.config, spec.split, spec.column) == (None, "validation", "text")
    with pytest.raises(SlimlmError, match="hf:<path>"):
        parse_hf_spec("a:b:c:d:e")


def test_local_hf_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "body": ["x", "y", "z"]})
    data.save_to_disk(str(tmp_path / "ds"))
    assert load_documents(f"hf:{tmp_path / 'ds'}") == ["alpha", "beta"]
    assert load_documents(f"hf:{tmp_path / 'ds'}:::body") == ["x", "y", "z"]
    assert load_documents(str(tmp_path / "ds")) == ["alpha", "beta"]  # a bare directory path
    with pytest.raises(SlimlmError, match="no column 'missing'; columns: text, body"):
        load_documents(f"hf:{tmp_path / 'ds'}:::missing")
    datasets.DatasetDict({"train": data, "test": data.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert load_documents(f"hf:{tmp_path / 'dd'}:test") == ["beta"]
    with pytest.raises(SlimlmError, match="no split 'dev'; valid: train, test"):
        load_documents(f"hf:{tmp_path / 'dd'}:dev")
    with pytest.raises(SlimlmError, match="has splits train, test; name one"):
        load_documents(f"hf:{tmp_path / 'dd'}")


def test_hf_hub_unreachable_names_offline_and_network(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/ds' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SlimlmError, match=r"cannot load dataset 'org/ds'.*network.*HF_DATASETS_OFFLINE"):
        load_documents("hf:org/ds:train")


def test_missing_datasets_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SlimlmError, match="pip install datasets"):
        load_documents("hf:org/ds:train")


# ---------------------------------------------------------------- real tokenizer

@pytest.mark.real_model
def test_wiki_protocol_token_counts_with_smollm2_tokenizer(wiki, monkeypatch, caplog):
    from transformers import AutoTokenizer

    from slimlm.models import builtin

    gguf = builtin.gguf_path(builtin.BUILTINS["smollm2-135m"])  # present: tests/conftest.py skips otherwise
    monkeypatch.setenv("SLIMLM_CACHE", str(wiki[0]))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    split = protocol_texts("wiki-v1")
    n_eval = tokenize_documents(tok, split.evaluation).numel()
    n_calib = tokenize_documents(tok, split.calibration).numel()
    logging.getLogger(__name__).info("wiki-v1 SmolLM2 tokens: calibration %d, evaluation %d", n_calib, n_eval)
    assert n_eval > 4 * 16_384
    assert n_calib > 128 * 512
    assert calibration_batch(tok, split.calibration).shape == (128, 512)


# ---------------------------------------------------------------- a user's text

def test_text_hash_covers_content_and_document_boundaries(tmp_path):
    from slimlm.data import load_text, text_sha256, user_texts

    assert text_sha256(["ab", "c"]) != text_sha256(["a", "bc"]) != text_sha256(["abc"])
    assert text_sha256(["ab", "c"]) == text_sha256(("ab", "c"))
    a = tmp_path / "a.txt"
    a.write_text("one\n\ntwo\n\nthree\n\nfour\n")
    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one", "two", "three", "four")))
    text = load_text(str(a))
    assert text.documents == ("one", "two", "three", "four") and text.part == "all"
    assert text.record() == {"source": str(a), "sha256": text.sha256} and len(text.sha256) == 64
    calib, evaluation = user_texts(str(a), str(copy))  # the same documents: split, whatever the file format
    assert calib.part == "calibration" and evaluation.part == "evaluation"
    assert set(calib.documents) | set(evaluation.documents) == set(text.documents)
    assert user_texts(str(a), str(copy)) == (calib, evaluation)  # deterministic
    assert user_texts(None, str(a)) == (None, text)
