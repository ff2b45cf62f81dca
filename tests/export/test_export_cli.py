"""`slimlm export --format gguf|compressed-tensors` from the CLI; --requantize prints the KLD it costs."""

import copy

import pytest
import torch

from slimlm.cli import main
from slimlm.export.verify import export_kld, mean_kld
from slimlm.formats.scheme import NF4Scheme
from slimlm.models.tiny import tiny_model

from .gguf_util import checkpoint


def _error(capsys, code):
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("fmt,name", [("gguf", "m.gguf"), ("compressed-tensors", "ct")])
def test_export_writes_the_format_named(capsys, tmp_path, fmt, name):
    ckpt = checkpoint(tmp_path, "int4-g32")
    out = tmp_path / name
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    assert out.exists() and f"to {out}" in capsys.readouterr().out
    assert _error(capsys, main(["export", str(ckpt), "--format", fmt, "--out", str(out)])) and out.exists()


def test_unknown_format_and_gguf_options_elsewhere_are_refused(capsys, tmp_path):
    ckpt = checkpoint(tmp_path, "int4-g32")
    line = _error(capsys, main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "x")]))
    assert "valid: hf, gguf, compressed-tensors" in line
    line = _error(capsys, main(["export", str(ckpt), "--requantize", "q4_0", "--out", str(tmp_path / "y")]))
    assert "--format gguf" in line and not (tmp_path / "y").exists()


def test_requantize_prints_its_kld_and_an_unexportable_scheme_is_refused_without_it(capsys, tmp_path):
    ckpt = checkpoint(tmp_path, NF4Scheme(block_size=32))
    out = tmp_path / "nf4.gguf"
    assert "requantize" in _error(capsys, main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]))
    assert not out.exists()
    argv = ["export", str(ckpt), "--format", "gguf", "--out", str(out), "--requantize", "q4_0", "--protocol",
            "pydoc-v1"]  # fmt: skip
    assert main(argv) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("re-quantized to q4_0")][0]
    kld = float(line.split("KLD ")[1].split()[0])
    assert 1e-5 < kld < 0.5, line  # NF4 -> Q4_0 moves every weight a little


def test_an_exact_export_read_back_costs_no_kld(tmp_path):
    ckpt = checkpoint(tmp_path, "int4-g32")
    from slimlm.export.gguf import export_gguf

    export_gguf(ckpt, tmp_path / "m.gguf", float_type="f32")
    kld, tokens = export_kld(ckpt, tmp_path / "m.gguf", protocol="pydoc-v1", n_tokens=512)
    assert tokens == 512 and kld < 1e-6


def test_mean_kld_is_zero_for_the_same_model_and_positive_otherwise():
    a = tiny_model("llama")
    b = copy.deepcopy(a)
    windows = torch.randint(0, a.config.vocab_size, (2, 16))
    assert mean_kld(a, a, windows) == 0.0
    with torch.no_grad():
        b.lm_head.weight.mul_(1.5)
    assert mean_kld(a, b, windows) > 1e-4
