import dataclasses
import json
import re
import shutil

import pytest
import torch

from slimlm.api import apply
from slimlm.cli import main
from slimlm.data import load_documents, text_sha256, tokenize_documents
from slimlm.eval import calibration_ids, get_protocol, load_result, with_user_text
from slimlm.io import MANIFEST, WEIGHTS, save_compressed
from slimlm.models.tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer
from slimlm.pipelines.compress import compress
from slimlm.quant import RTN

FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]
PY_FAST = dict(protocol="pydoc-v1", tokens=512, speed=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


def _one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0
    assert "Traceback" not in err and len(errors) == 1 and pattern in errors[0], err
    return errors[0]


@pytest.mark.parametrize("argv, pattern", [
    (["eval", "/no/such/model"], "does not exist"),
    (["eval", ".", "--protocol", "pydoc-v1"], "not a model (no config.json)"),
    (["eval", "no-such-builtin"], "unknown model 'no-such-builtin'"),
    (["info", "/no/such/model"], "does not exist"),
    (["compress", "--recipe", "nope"], "no recipe 'nope'"),
    (["export", "/no/such/ckpt", "--out", "x"], "does not exist"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(capsys, argv, pattern):
    _one_line_error(capsys, main(argv), pattern)


def test_bad_protocol_and_short_text(capsys, tiny_dir):
    _one_line_error(capsys, main(["eval", tiny_dir, "--protocol", "wiki-v9"]), "unknown protocol 'wiki-v9'; valid: wiki-v1")
    line = _one_line_error(capsys, main(["eval", tiny_dir, "--protocol", "pydoc-v1", "--tokens", "99999999", "--no-speed"]),
                           "tokens")
    assert "--tokens" in line


def test_existing_json_is_refused_before_any_work(capsys, tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    _one_line_error(capsys, main(["eval", tiny_dir, *FAST, "--json", str(out)]), "--overwrite")
    assert out.read_text() == "keep me"


def test_debug_shows_the_traceback(tiny_dir):
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError):
        main(["--debug", "eval", "/no/such/model"])


def test_eval_prints_a_table_and_writes_json(capsys, tiny_dir, tmp_path):
    assert main(["eval", tiny_dir, *FAST, "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "pydoc-v1" in table
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["schema"] == "slimlm.result/1" and result["quality"]["kld"] == 0.0
    assert result["quality"]["tokens"] == 512 and result["env"]["threads"] >= 1


def test_compress_then_eval_export_and_compare(capsys, tiny_dir, tmp_path):
    out = tmp_path / "c"
    assert main(["compress", "--model", tiny_dir, "--recipe", "rtn-int4-g64", "--out", str(out), *FAST]) == 0
    table = capsys.readouterr().out
    assert "bits per weight" in table and "4.50" in table and "saved to" in table
    _one_line_error(capsys, main(["compress", "--model", tiny_dir, "--out", str(out), *FAST]), "--overwrite")
    assert main(["eval", str(out), *FAST, "--json", str(tmp_path / "c.json")]) == 0  # base from the manifest
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["base"] == tiny_dir and result["quality"]["kld"] > 0
    assert main(["eval", "--compare", tiny_dir, str(tmp_path / "c.json"), *FAST]) == 0
    assert "(+" in capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert main(["info", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_two_compress_json_files_compare_with_their_shared_base_once(capsys, tiny_dir, tmp_path):
    for recipe in ("rtn-int4-g64", "rtn-int8-g64"):
        assert main(["compress", "--model", tiny_dir, "--recipe", recipe, "--out", str(tmp_path / recipe), *FAST,
                     "--json", str(tmp_path / f"{recipe}.json")]) == 0  # a comparison: base + compressed
    capsys.readouterr()
    a, b = (str(tmp_path / f"{r}.json") for r in ("rtn-int4-g64", "rtn-int8-g64"))
    assert main(["eval", "--compare", a, b, *FAST, "--json", str(tmp_path / "all.json")]) == 0
    header = capsys.readouterr().out.splitlines()
    columns = next(line for line in header if "rtn-int4-g64" in line)
    assert tiny_dir in columns and "rtn-int8-g64" in columns
    doc = json.loads((tmp_path / "all.json").read_text())
    assert [r["model"] for r in doc["results"]] == [tiny_dir, str(tmp_path / "rtn-int4-g64"),
                                                     str(tmp_path / "rtn-int8-g64")]  # the shared base once


def test_generate_streams_text(capsys, tiny_dir):
    assert main(["generate", tiny_dir, "The capital", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    _one_line_error(capsys, main(["generate", tiny_dir, "x", "--temperature", "-1"]), "--temperature")


def test_compress_with_a_calibrated_recipe_records_its_calibration(capsys, tiny_dir, tmp_path):
    out = tmp_path / "g"
    assert main(["compress", "--model", tiny_dir, "--recipe", "gptq-int4-g64", "--out", str(out),
                 "--calib-samples", "2", *FAST]) == 0
    manifest = json.loads((out / "slimlm_manifest.json").read_text())
    assert manifest["calibration"] == {"protocol": "pydoc-v1", "samples": 2, "seq_len": 512, "seed": 0}
    assert manifest["recipe"]["name"] == "gptq-int4-g64"
    _one_line_error(capsys, main(["compress", "--model", tiny_dir, "--recipe", "gptq-int4-g64", "--out",
                                  str(tmp_path / "h"), "--calib-samples", "0", *FAST]), "--calib-samples")


# ---------------------------------------------------------------- the pipeline from Python; a user's text

def user_file(path, words=("zebra", "lantern", "quartz"), n_docs=12):
    """A .txt of ``n_docs`` paragraphs (documents) of words no built-in text is made of."""
    paras = [f"Note {i}: " + " ".join(f"{w}{i % 3}" for w in words) * 20 for i in range(n_docs)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def test_compress_from_python_equals_the_cli(capsys, tiny_dir, tmp_path):
    out = tmp_path / "c"
    assert main(["compress", "--model", tiny_dir, "--recipe", "rtn-int4-g64", "--out", str(out), *FAST,
                 "--json", str(tmp_path / "cli.json")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    cli = json.loads((tmp_path / "cli.json").read_text())["results"]
    report = compress(tiny_dir, "rtn-int4-g64", out=out, overwrite=True, **PY_FAST)
    assert report.out == out and report.recipe == "rtn-int4-g64" and report.seconds >= 0
    for ours, theirs in zip(report.results, cli):
        assert (ours.protocol, ours.model, ours.base) == (theirs["protocol"], theirs["model"], theirs["base"])
        assert dataclasses.asdict(ours.size) == theirs["size"]
        assert ours.quality.perplexity == pytest.approx(theirs["quality"]["perplexity"], rel=1e-6)
        assert ours.quality.kld == pytest.approx(theirs["quality"]["kld"], abs=1e-6)
    summary = report.summary().splitlines()
    assert summary[0] == printed[0] and summary[-1].startswith("recipe rtn-int4-g64: compressed in ")
    assert summary[-1].endswith(f"saved to {out}") and printed[-1].endswith(f"saved to {out}")
    assert [ln.split()[0] for ln in summary[2:-1] if ln] == [ln.split()[0] for ln in printed[2:-1] if ln]


def test_calibration_on_a_user_file_is_recorded_and_drawn_only_from_it(tiny_dir, tmp_path):
    text = user_file(tmp_path / "notes.txt")
    proto = dataclasses.replace(get_protocol("pydoc-v1"), calib_seed=7)  # the seed comes from the protocol
    report = compress(tiny_dir, "gptq-int4-g64", out=tmp_path / "g", protocol=proto, calib_data=str(text),
                      calib_samples=2, tokens=512, speed=False)  # fmt: skip
    manifest = json.loads((tmp_path / "g" / "slimlm_manifest.json").read_text())
    sha = text_sha256(load_documents(str(text)))
    assert manifest["calibration"] == {"protocol": "pydoc-v1", "source": str(text), "sha256": sha, "samples": 2,
                                       "seq_len": 512, "seed": 7}  # fmt: skip
    assert report.compressed.protocol == "pydoc-v1"  # calibration changes the model, not the measurement
    tok = tiny_tokenizer()
    calib = calibration_ids(tok, with_user_text(proto, calib_data=str(text)), n_samples=8)  # (8, 512)
    windows = tokenize_documents(tok, load_documents(str(text))).unfold(0, 512, 1)  # every window of the file
    assert all((windows == row).all(dim=1).any() for row in calib)
    assert not torch.equal(calib, calibration_ids(tok, with_user_text("pydoc-v1", calib_data=str(text)), n_samples=8))


def test_eval_on_a_user_text_names_it_and_refuses_other_protocols(capsys, tiny_dir, tmp_path):
    text = user_file(tmp_path / "notes.txt")
    assert main(["eval", tiny_dir, "--eval-data", str(text), "--no-speed", "--json", str(tmp_path / "u.json")]) == 0
    sha = text_sha256(load_documents(str(text)))
    assert f"text {text}, sha256 {sha[:12]}" in capsys.readouterr().out
    result = json.loads((tmp_path / "u.json").read_text())
    assert result["protocol"] == f"wiki-v1+text:{sha[:12]}"
    assert result["text_source"] == str(text) and result["text_sha256"] == sha
    assert load_result(tmp_path / "u.json").text_sha256 == sha
    assert main(["eval", tiny_dir, *FAST, "--json", str(tmp_path / "p.json")]) == 0
    assert "text_sha256" not in json.loads((tmp_path / "p.json").read_text())  # built-in texts: JSON as before
    assert main(["eval", str(tmp_path / "p.json")]) == 0  # a saved result is printed again
    capsys.readouterr()
    line = _one_line_error(capsys, main(["eval", "--compare", str(tmp_path / "p.json"), str(tmp_path / "u.json")]),
                           "cannot set results of different protocols or texts side by side")
    assert "pydoc-v1" in line and sha[:12] in line
    _one_line_error(capsys, main(["eval", "--compare", tiny_dir, str(tmp_path / "p.json"), "--eval-data", str(text),
                                  "--json", str(tmp_path / "x.json")]), "cannot set")
    assert not (tmp_path / "x.json").exists()


def _write(path, text):
    path.write_text(text)
    return path


SHORT = r"holds \d+ tokens, fewer than one window of 512 needed to score it"


@pytest.mark.parametrize("make, eval_pattern, calib_pattern", [
    (lambda d: _write(d / "empty.txt", ""), "holds no text", "holds no text"),
    (lambda d: _write(d / "bad.jsonl", '{"text": "a"}\nnot json\n'), "line 2 is not valid JSON", "line 2 is not"),
    (lambda d: _write(d / "short.txt", "A short note.\n\nAnother one.\n"), SHORT,
     r"holds only \d+ tokens, fewer than one sequence of 512 needed for calibration"),
    (lambda d: d / "missing.txt", "does not exist", "does not exist"),
])
def test_bad_user_text_gets_one_line_and_nothing_written(capsys, tiny_dir, tmp_path, make, eval_pattern,
                                                         calib_pattern):
    src = str(make(tmp_path))
    for flag, pattern in (("--eval-data", eval_pattern), ("--calib-data", calib_pattern)):
        line = _one_line_error(capsys, main(["compress", "--model", tiny_dir, "--recipe", "gptq-int4-g64", "--out",
                                             str(tmp_path / "c"), flag, src, *FAST]), "")  # fmt: skip
        assert re.search(pattern, line), line
        assert not (tmp_path / "c").exists() and not (tmp_path / "cache" / "base").exists()
    line = _one_line_error(capsys, main(["eval", tiny_dir, "--eval-data", src, "--no-speed", "--json",
                                         str(tmp_path / "r.json")]), "")  # fmt: skip
    assert re.search(eval_pattern, line), line
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "cache" / "base").exists()


def test_nonpositive_token_budget_is_refused_by_eval_and_compress(capsys, tiny_dir, tmp_path):
    for argv in (["eval", tiny_dir], ["compress", "--model", tiny_dir, "--out", str(tmp_path / "c")]):
        _one_line_error(capsys, main([*argv, "--protocol", "pydoc-v1", "--tokens", "0"]), "--tokens must be a positive")
    assert not (tmp_path / "c").exists()


# --- every bad input: exit status 2, one stderr line starting ``error:`` that names the fix, nothing written


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
    _refused(capsys, ["export", str(checkpoint), "--format", "onnx", "--out", str(out)],
             "unknown export format 'onnx'; valid: hf, gguf, compressed-tensors", out)  # fmt: skip


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
    ("bit flip", "is corrupt or truncated (it does not match its manifest's sha256); compress again"),
    ("bits 3", "manifest was changed after its tensors were written; the checkpoint is damaged: compress again"),
])  # fmt: skip
def test_corrupt_checkpoint(capsys, checkpoint, tmp_path, how, fix):
    src, out, js = _damaged(checkpoint, tmp_path, how), tmp_path / "x", tmp_path / "r.json"
    _refused(capsys, ["eval", src, *FAST, "--json", str(js)], fix, js)
    _refused(capsys, ["export", src, "--out", str(out)], fix, out)
    _refused(capsys, ["generate", src, "hello", "--max-new-tokens", "2"], fix)
