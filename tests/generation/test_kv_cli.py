import pytest

from slimlm.cli import main
from slimlm.models.tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="llama"))


def _gen(capsys, tiny_dir, *flags):
    code = main(["generate", tiny_dir, "The capital of France is Paris. The capital", "--max-new-tokens", "8", *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_with_a_compressed_kv_cache(capsys, tiny_dir):
    _, plain, _ = _gen(capsys, tiny_dir)
    code, out, err = _gen(capsys, tiny_dir, "--kv-policy", "sinks", "--kv-budget", "64")
    assert code == 0 and out == plain  # nothing evicted: the same greedy text
    assert "KV cache sinks(4)+window b=64:" in err and "MB held" in err
    for flags in (["--kv-policy", "window", "--kv-budget", "8"], ["--kv-policy", "h2o", "--kv-budget", "8"],
                  ["--kv-bits", "4"]):
        code, out, err = _gen(capsys, tiny_dir, *flags)
        assert code == 0 and out.strip() and "MB held" in err


@pytest.mark.parametrize("flags, pattern", [
    (["--kv-policy", "sinks"], "needs a budget"),
    (["--kv-budget", "64"], "--kv-budget needs --kv-policy"),
    (["--kv-policy", "sinks", "--kv-budget", "4"], "at least sinks + 1 = 5"),
    (["--kv-policy", "h2o", "--kv-budget", "64", "--kv-bits", "4"], "do not combine"),
    (["--kv-bits", "4", "--engine", "hf"], "drop --draft / --engine hf"),
])
def test_bad_kv_flags_get_one_line(capsys, tiny_dir, flags, pattern):
    code, _, err = _gen(capsys, tiny_dir, *flags)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(errors) == 1 and pattern in errors[0], err


def test_generate_with_a_half_precision_kv_cache(capsys, tiny_dir):
    code, out, err = _gen(capsys, tiny_dir, "--kv-dtype", "float16")
    assert code == 0 and out.strip(), err
    code, _, err = _gen(capsys, tiny_dir, "--kv-dtype", "float16", "--engine", "hf")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(errors) == 1 and "drop --draft / --engine hf" in errors[0], err
