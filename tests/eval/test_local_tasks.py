"""slimlm's local lm-eval tasks: how they are built, that the shipped files rebuild byte for byte,
that lm-eval loads them through include_path, and task_accuracy's scores and refusals."""

import json
import sys

import pytest

from slimlm.data import protocol_texts, text_sha256
from slimlm.errors import SlimlmError
from slimlm.eval.accuracy import check_tasks, parse_tasks, task_accuracy, task_manager
from slimlm.eval.tasks import LOCAL_TASKS, TASKS_DIR, build
from slimlm.models.tiny import tiny_model, tiny_tokenizer

DOCS = [
    "Intro line without period\n\nA Heading\nAlpha beta gamma delta. " + "Filler words here and there. " * 8
    + "It ended with thunder.",
    "First point of docs two. Second point follows here. Third point closes the paragraph.\n\n   indented code line",
    "Other topic sentence number one. Other topic sentence number two is here. Another unrelated sentence is here.",
    "Yet another document, the fourth one. It has its own sentences too. A final sentence of the fourth well-\n"
    "known document.",
]


def test_lastword_passages_are_paragraphs_cut_before_their_last_word():
    records = build.lastword_records(DOCS)
    paragraph = DOCS[0].split("\n\n")[1].removeprefix("A Heading\n")  # the heading line is dropped
    assert records == [{"context": " ".join(paragraph.split())[: -len(" thunder.")], "target": " thunder"}]


def test_choice_questions_hold_the_true_next_sentence_and_distractors_from_other_documents():
    records = build.choice_records(DOCS, seed=3)
    flat = [" ".join(doc.replace("-\n", "-").split()) for doc in DOCS]
    # one question in each of DOCS[1:]: their third sentence (the second is < 30 characters, or its one
    # sentence of context < 40); DOCS[0] has no sentence of 30..200 characters after one; DOCS[1]'s code is skipped
    assert [r["choices"][r["label"]] for r in records] == ["Third point closes the paragraph.",
        "Another unrelated sentence is here.", "A final sentence of the fourth well-known document."]  # fmt: skip
    assert records == build.choice_records(DOCS, seed=3)
    for r in records:
        answer = r["choices"][r["label"]]
        homes = [d for d, text in enumerate(flat) if r["context"] + " " + answer in text]  # the answer follows
        assert len(homes) == 1 and len(set(r["choices"])) == 4
        for i, choice in enumerate(r["choices"]):
            if i != r["label"]:
                assert choice not in flat[homes[0]] and any(choice in t for t in flat)


def test_the_shipped_task_files_rebuild_byte_for_byte():
    info = json.loads((TASKS_DIR / build.INFO_FILE).read_text())
    here = {"wiki-v1/evaluation": text_sha256(protocol_texts("wiki-v1").evaluation),
            "pydoc-v1/evaluation": text_sha256(protocol_texts("pydoc-v1").evaluation)}  # fmt: skip
    assert here == info["texts_sha256"], (
        f"the protocol texts here differ from those the tasks were built from (Python {info['python']}'s pydoc_data, "
        f"gensim's wiki file); this Python is {sys.version_info.major}.{sys.version_info.minor}")
    assert build.differences() == []
    sizes = [(TASKS_DIR / f).stat().st_size for f in (build.LASTWORD_FILE, build.CHOICE_FILE)]
    assert sum(sizes) < 300_000 and build.main(["--check"]) == 0


def test_the_builder_refuses_to_overwrite(tmp_path):
    assert build.main(["--out", str(tmp_path)]) == 0
    assert build.differences(tmp_path) == []
    with pytest.raises(SlimlmError, match="--overwrite"):
        build.write_files(tmp_path)
    (tmp_path / build.CHOICE_FILE).write_text("{}\n")
    assert build.differences(tmp_path) == [build.CHOICE_FILE]


def test_lm_eval_loads_the_local_tasks_from_include_path():
    tm = task_manager(hub_tasks=False)
    assert set(LOCAL_TASKS) <= set(tm.all_tasks)
    tasks = tm.load(list(LOCAL_TASKS))["tasks"]
    for name, file in zip(LOCAL_TASKS, (build.LASTWORD_FILE, build.CHOICE_FILE)):
        lines = (TASKS_DIR / file).read_text().splitlines()
        assert len(list(tasks[name].test_docs())) == len(lines)


def test_task_accuracy_on_a_tiny_model():
    scores = task_accuracy(tiny_model("llama"), tiny_tokenizer(add_bos=True), LOCAL_TASKS, limit=8, batch_size=4)
    assert set(scores) == set(LOCAL_TASKS)
    assert set(scores["slimlm_pydoc_choice"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    for row in scores.values():
        assert 0.0 <= row["acc"] <= 1.0 and row["samples"] == 8


@pytest.mark.parametrize("tasks, pattern", [
    ((), "no task given"),
    (("slimlm_pydoc_choice", "slimlm_pydoc_choice"), "listed twice"),
    (("slimlm_nope",), "unknown slimlm task 'slimlm_nope'; slimlm's local tasks: slimlm_wiki_lastword"),
])
def test_bad_task_lists_are_refused_in_one_line(tasks, pattern):
    with pytest.raises(SlimlmError, match=pattern) as e:
        check_tasks(tasks)
    assert "\n" not in str(e.value)


def test_missing_lm_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(SlimlmError, match=r"pip install 'slimlm\[tasks\]'"):
        check_tasks(["slimlm_pydoc_choice"])


def test_parse_tasks():
    assert parse_tasks(" slimlm_wiki_lastword, ,hellaswag,") == ("slimlm_wiki_lastword", "hellaswag")
