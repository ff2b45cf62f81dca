"""`slimlm generate --draft ...`: same text as plain greedy, a report on stderr and in --json, one-line refusals."""

import json

import pytest

from slimlm.cli import main
from slimlm.models.tiny import save_tiny_model_dir, tiny_tokenizer

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    path = save_tiny_model_dir(tmp_path_factory.mktemp("m") / "other", family="llama", seed=1)
    tiny_tokenizer(300).save_pretrained(path)  # a different vocabulary
    return str(path)


@pytest.mark.parametrize("draft", ["lookup", "layers:1", "int8"])
def test_generate_with_a_draft_prints_the_plain_text_and_a_report(capsys, tmp_path, tiny_dir, draft):
    assert main(["generate", tiny_dir, PROMPT, "--max-new-tokens", "16"]) == 0
    plain = capsys.readouterr().out
    out_json = tmp_path / "spec.json"
    assert main(["generate", tiny_dir, PROMPT, "--max-new-tokens", "16", "--draft", draft, "--k", "3",
                 "--json", str(out_json)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == plain and plain.strip()
    report = [line for line in captured.err.splitlines() if line.startswith(f"draft {draft}:")]
    assert len(report) == 1 and "acceptance" in report[0] and "tokens per target call" in report[0]
    assert "output identical to plain greedy" in report[0]
    doc = json.loads(out_json.read_text())
    assert doc["draft"] == draft and doc["identical"] is True and doc["speedup"] > 0
    assert doc["stats"]["new_tokens"] == len(doc["tokens"]) == 16
    assert 0 <= doc["stats"]["acceptance_rate"] <= 1 and doc["stats"]["tokens_per_call"] >= 1


def test_sampled_generation_with_a_draft_is_seeded(capsys, tiny_dir):
    argv = ["generate", tiny_dir, PROMPT, "--max-new-tokens", "12", "--draft", "int8", "--temperature", "0.9",
            "--top-k", "40", "--seed", "4", "--fixed-k", "--no-baseline"]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


@pytest.mark.parametrize("argv, pattern", [
    (["--draft", "lookup", "--k", "0"], "--k (draft tokens per round) must be >= 1"),
    (["--k", "3"], "--k: for speculative decoding only; add --draft"),
    (["--draft", "lookup", "--engine", "hf"], "--draft runs on slimlm's decode loop"),
    (["--draft", "layers:5"], "1 <= layers < 2"),
    (["--draft", "layers:two"], "expected a whole number"),
    (["--draft", "lookup", "--top-p", "2"], "--top-p"),
    (["--draft", "/no/such/model"], "does not exist"),
])  # fmt: skip
def test_bad_draft_arguments_one_line_exit_2(capsys, tiny_dir, argv, pattern):
    assert main(["generate", tiny_dir, PROMPT, "--max-new-tokens", "4", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and pattern in err[0], err


def test_a_draft_with_another_tokenizer_is_refused(capsys, tiny_dir, other_tokenizer_dir):
    assert main(["generate", tiny_dir, PROMPT, "--draft", other_tokenizer_dir]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "different tokenizer" in err[0]


def test_json_is_not_overwritten_without_overwrite(capsys, tmp_path, tiny_dir):
    out_json = tmp_path / "exists.json"
    out_json.write_text("{}")
    assert main(["generate", tiny_dir, PROMPT, "--draft", "lookup", "--json", str(out_json)]) == 2
    assert out_json.read_text() == "{}" and "--overwrite" in capsys.readouterr().err
