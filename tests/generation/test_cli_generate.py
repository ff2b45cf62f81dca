import pytest

from slimlm.cli import main
from slimlm.models.tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", family="qwen2"))


def test_slimlm_engine_prints_what_hf_generate_prints(capsys, qwen_dir):
    outs = {}
    for engine in ("slimlm", "hf"):
        assert main(["generate", qwen_dir, "The capital of", "--max-new-tokens", "12", "--engine", engine]) == 0
        outs[engine] = capsys.readouterr().out
    assert outs["slimlm"].strip() and outs["slimlm"] == outs["hf"]
    for engine in ("slimlm", "hf"):
        argv = ["generate", qwen_dir, "The", "--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.9",
                "--seed", "3", "--engine", engine]
        runs = []
        for _ in range(2):
            assert main(argv) == 0
            runs.append(capsys.readouterr().out)
        assert runs[0] == runs[1] and runs[0].strip()  # seeded


@pytest.mark.parametrize("argv, pattern", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "2"], "--top-p"),
    (["--compile", "--engine", "hf"], "--compile"),
    (["--compile", "--draft", "lookup"], "--compile"),
    (["--compile", "--kv-bits", "4"], "--compile"),
])  # fmt: skip
def test_bad_generate_arguments_one_line_exit_2(capsys, qwen_dir, argv, pattern):
    assert main(["generate", qwen_dir, "x", *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and pattern in err[0]


def test_compile_prints_what_the_eager_loop_prints(capsys, qwen_dir):
    outs = []
    for extra in ([], ["--compile"]):
        assert main(["generate", qwen_dir, "The capital of", "--max-new-tokens", "8", *extra]) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out.strip() and outs[1].out == outs[0].out
    assert "torch.compile of the decode step failed" not in outs[1].err
