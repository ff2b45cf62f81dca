"""Every bad CLI input: exit status 2, one stderr line starting ``error:`` that names the fix, nothing written."""

import json
import shutil

import pytest

from slimlm.api import apply
from slimlm.cli import main
from slimlm.io import MANIFEST, WEIGHTS, save_compressed
from slimlm.models.tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer
from slimlm.quant import RTN

FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_compressed(apply(tiny_model("llama"), RTN(scheme="int4-g16")), tiny_tokenizer(),
                           tmp_path_factory.mktemp("c") / "ckpt")  # fmt: skip


def _refused(capsys, argv, fix, *written):
    """Run ``argv``: exit 2, one ``error:`` line holding ``fix`` (the last line; the rest progress bars), no file."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and fix in errors[0], err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == errors[0], err
    for path in written:
        assert not path.exists(), path
    return errors[0]


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_nonpositive_tokens(capsys, tiny_dir, tmp_path, tokens):
    out, js = tmp_path / "c", tmp_path / "r.json"
    _refused(capsys, ["eval", tiny_dir, "--protocol", "pydoc-v1", "--tokens", tokens, "--json", str(js)],
             f"--tokens must be a positive int (evaluation tokens), got {tokens}", js)  # fmt: skip
    _refused(capsys, ["compress", "--model", tiny_dir, "--out", str(out), "--json", str(js), "--protocol", "pydoc-v1",
                      "--tokens", tokens], "--tokens must be a positive", out, js)  # fmt: skip


def test_several_models_without_compare(capsys, tiny_dir, tmp_path):
    js = tmp_path / "r.json"
    _refused(capsys, ["eval", tiny_dir, tiny_dir, *FAST, "--json", str(js)], "pass --compare", js)


def test_unknown_export_format(capsys, checkpoint, tmp_path):
    out = tmp_path / "x"
    _refused(capsys, ["export", str(checkpoint), "--format", "gguf", "--out", str(out)],
             "unknown export format 'gguf'; valid: hf", out)  # fmt: skip


def test_generate_without_a_prompt(capsys):
    _refused(capsys, ["generate"], 'generate needs a prompt: slimlm generate [MODEL] "PROMPT"')


@pytest.mark.parametrize("argv, fix", [
    (["eval", "--tokens", "many"], "argument --tokens: invalid int value: 'many' (see `slimlm eval --help`)"),
    (["generate", "x", "--kv-bits", "3"], "argument --kv-bits: invalid choice: 3"),
    (["compress", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "the following arguments are required: command (see `slimlm --help`)"),
])  # fmt: skip
def test_argument_errors_are_one_line_too(capsys, argv, fix):
    _refused(capsys, argv, fix)


def test_chat_without_a_chat_template(capsys, tiny_dir):
    _refused(capsys, ["generate", tiny_dir, "hello", "--chat", "--max-new-tokens", "2"],
             "this tokenizer has no chat template; drop --chat")  # fmt: skip


def test_a_prompt_that_tokenizes_to_nothing(capsys, tiny_dir, tmp_path):
    js = tmp_path / "s.json"
    _refused(capsys, ["generate", tiny_dir, "", "--max-new-tokens", "2"], "the prompt is empty after tokenization")
    _refused(capsys, ["generate", tiny_dir, "", "--max-new-tokens", "2", "--draft", "lookup", "--json", str(js)],
             "the prompt is empty after tokenization", js)  # fmt: skip


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_bad_threads(capsys, tiny_dir, tmp_path, threads):
    js = tmp_path / "r.json"
    _refused(capsys, ["--threads", threads, "eval", tiny_dir, *FAST, "--json", str(js)],
             f"--threads must be a positive int (torch CPU threads), got {threads}", js)  # fmt: skip


def test_missing_base(capsys, tiny_dir, tmp_path):
    js = tmp_path / "r.json"
    _refused(capsys, ["eval", tiny_dir, *FAST, "--base", str(tmp_path / "no-base"), "--json", str(js)],
             f"model path {tmp_path / 'no-base'} does not exist", js)  # fmt: skip


@pytest.mark.parametrize("text, fix", [
    ("steps: [\n  - method: rtn\n", "is not valid YAML"),
    ("steps:\n  - method: rtn\n    nonsense: 3\n", "unknown key(s) nonsense for method rtn; valid: scheme"),
    ("steps:\n  - method: nosuch\n", "unknown method 'nosuch'; valid: rtn, gptq"),
    ("just a string\n", "a recipe is a mapping with a non-empty 'steps' list"),
])  # fmt: skip
def test_malformed_recipe_yaml(capsys, tiny_dir, tmp_path, text, fix):
    recipe, out, js = tmp_path / "bad.yaml", tmp_path / "c", tmp_path / "r.json"
    recipe.write_text(text)
    _refused(capsys, ["compress", "--model", tiny_dir, "--recipe", str(recipe), "--out", str(out), "--json", str(js),
                      *FAST], fix, out, js, tmp_path / "cache" / "base")  # fmt: skip


def _damaged(checkpoint, tmp_path, how):
    folder = shutil.copytree(checkpoint, tmp_path / "damaged")
    if how == "truncated":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "bit flip":
        data = bytearray((folder / WEIGHTS).read_bytes())
        data[-3] ^= 0x10
        (folder / WEIGHTS).write_bytes(bytes(data))
    else:  # the case: a scheme saying 3 bits over 4-bit codes
        manifest = json.loads((folder / MANIFEST).read_text())
        next(iter(manifest["modules"].values()))["scheme"]["bits"] = 3
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


@pytest.mark.parametrize("how, fix", [
    ("truncated", "is corrupt or truncated"),
    ("bit flip", "is corrupt or truncated (its sha256 differs from the one its manifest records); compress again"),
    ("bits 3", "manifest was changed after its tensors were written; the checkpoint is damaged: compress again"),
])  # fmt: skip
def test_corrupt_checkpoint(capsys, checkpoint, tmp_path, how, fix):
    src, out, js = _damaged(checkpoint, tmp_path, how), tmp_path / "x", tmp_path / "r.json"
    _refused(capsys, ["eval", src, *FAST, "--json", str(js)], fix, js)
    _refused(capsys, ["export", src, "--out", str(out)], fix, out)
    _refused(capsys, ["generate", src, "hello", "--max-new-tokens", "2"], fix)
