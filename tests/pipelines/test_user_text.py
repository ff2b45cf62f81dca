"""A user's text through the library: the split, the per-text base cache, refusals."""

import pytest

from slimlm.data import load_documents
from slimlm.errors import SlimlmError
from slimlm.eval import with_user_text
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.pipelines.evaluate import evaluate_sources


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))


def user_file(path, words=("zebra", "lantern", "quartz"), n_docs=12):
    """A .txt of ``n_docs`` paragraphs (documents) of words no built-in text is made of."""
    paras = [f"Note {i}: " + " ".join(f"{w}{i % 3}" for w in words) * 20 for i in range(n_docs)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def test_one_source_for_both_is_split_by_document(tmp_path):
    text = str(user_file(tmp_path / "notes.txt"))
    proto = with_user_text("wiki-v1", calib_data=text, eval_data=text)
    calib, evaluation = proto.calib_text, proto.eval_text
    assert (calib.part, evaluation.part) == ("calibration", "evaluation")
    assert not set(calib.documents) & set(evaluation.documents)
    assert sorted(calib.documents + evaluation.documents) == sorted(load_documents(text))
    assert proto.name == f"wiki-v1+text:{evaluation.sha256[:12]}" and proto.window == 512
    other = str(user_file(tmp_path / "other.txt", words=("copper", "violet")))
    whole = with_user_text("wiki-v1", calib_data=other, eval_data=text)
    assert whole.eval_text.documents == tuple(load_documents(text)) and whole.calib_text.source == other


def test_base_outputs_are_cached_per_text(tmp_path):
    tiny_dir = str(save_tiny_model_dir(tmp_path / "tiny", family="llama"))
    a, b = str(user_file(tmp_path / "a.txt")), str(user_file(tmp_path / "b.txt", words=("copper", "violet")))
    cached = lambda: sorted((tmp_path / "cache" / "base").glob("*.safetensors"))  # noqa: E731
    first = evaluate_sources([tiny_dir], eval_data=a, speed=False)[0]
    assert len(cached()) == 1
    again = evaluate_sources([tiny_dir], eval_data=a, speed=False)[0]
    assert len(cached()) == 1 and again.quality.perplexity == pytest.approx(first.quality.perplexity, rel=1e-6)
    other = evaluate_sources([tiny_dir], eval_data=b, speed=False)[0]
    assert len(cached()) == 2 and other.protocol != first.protocol


def test_too_short_token_counts_say_what_they_have_and_need(tmp_path):
    tiny_dir = str(save_tiny_model_dir(tmp_path / "tiny", family="llama"))
    path = tmp_path / "short.txt"
    path.write_text("A short note.\n\nAnother one.\n")
    with pytest.raises(SlimlmError, match=r"short.txt holds \d+ tokens, fewer than one window of 512"):
        evaluate_sources([tiny_dir], eval_data=str(path), speed=False)
    one_doc = user_file(tmp_path / "one.txt", n_docs=1)
    with pytest.raises(SlimlmError, match="needs at least 2 documents, got 1"):
        with_user_text("wiki-v1", calib_data=str(one_doc), eval_data=str(one_doc))
