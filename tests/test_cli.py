import json

import pytest

from slimlm.cli import main
from slimlm.models.tiny import save_tiny_model_dir

FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed"]


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
