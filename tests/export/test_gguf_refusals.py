"""GGUF export: requantize on request, and one-line refusals that leave nothing behind."""

import logging

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from slimlm.errors import SlimlmError
from slimlm.export import export
from slimlm.export.gguf import GGUFOptions, write_gguf
from slimlm.io import WEIGHTS, load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from tests.export.gguf_util import checkpoint


def _nothing_written(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".gguf") or ".tmp-" in p.name] == []


@pytest.mark.parametrize("scheme, recipe", [("int4-g16-sym", "gptq-q4_0"), ("int4-g16", "gptq-q4_1"),
                                            ("int3-g32", "gptq-q4_1"), ("nf4", "gptq-q4_0"),
                                            ("int8-g32", "rtn-q8_0"), ("ternary", "gptq-q4_0")])  # fmt: skip
def test_unexportable_schemes_are_refused_naming_the_recipe(tmp_path, scheme, recipe):
    ckpt = checkpoint(tmp_path, scheme)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SlimlmError, match=f"recipe {recipe} .*requantize=") as e:
        export(ckpt, out / "m.gguf", format="gguf")
    assert "\n" not in str(e.value) and "model.layers.0.self_attn.q_proj" in str(e.value)
    assert _nothing_written(out)


def test_requantize_rerounds_and_says_so(tmp_path, caplog):
    ckpt = checkpoint(tmp_path, "nf4")
    model, tok = load_compressed(ckpt)
    with caplog.at_level(logging.WARNING, logger="slimlm.export"):
        report = write_gguf(model, tok, tmp_path / "m.gguf", options=GGUFOptions(requantize="q4_0"))
    assert len(report.requantized) == 14 and "re-rounded 14 linears to Q4_0" in caplog.text
    reader = gguf.GGUFReader(report.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == QT.Q4_0 and report.file_type == "MOSTLY_Q4_0"
    # it is gguf-py's rounding of slimlm's dequantized weight (v: no permutation)
    v = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    W = model.get_submodule("model.layers.0.self_attn.v_proj").dequantized_weight()
    assert (v.data == gguf.quants.quantize(W.numpy(), QT.Q4_0)).all()


def test_requantize_keeps_exact_grids_exact(tmp_path):
    ckpt = checkpoint(tmp_path, "int4-g16", overrides=(("*.down_proj", "int8-g32-sym"),))
    model, tok = load_compressed(ckpt)
    report = write_gguf(model, tok, tmp_path / "m.gguf", options=GGUFOptions(requantize="q5_1"))
    how = {t.name: (t.how, t.type) for t in report.tensors}
    assert how["blk.0.ffn_down.weight"] == ("codes", "Q8_0") and how["blk.0.ffn_up.weight"] == ("requantized", "Q5_1")
    assert len(report.requantized) == 12


def test_existing_output_is_kept_without_overwrite(tmp_path):
    ckpt = checkpoint(tmp_path, "int8-g32-sym")
    out = export(ckpt, tmp_path / "m.gguf", format="gguf")
    before = out.read_bytes()
    with pytest.raises(SlimlmError, match="already exists; pass --overwrite"):
        export(ckpt, out, format="gguf", float_type="f32")
    assert out.read_bytes() == before
    export(ckpt, out, format="gguf", float_type="f32", overwrite=True)
    assert out.read_bytes() != before and [p.name for p in tmp_path.glob(".*tmp-*")] == []


def test_unsupported_architecture_is_refused(tmp_path):
    ckpt = save_compressed(tiny_model("qwen2"), tiny_tokenizer(), tmp_path / "q")
    with pytest.raises(SlimlmError, match="does not support 'qwen2' models; supported: llama"):
        export(ckpt, tmp_path / "m.gguf", format="gguf")
    assert _nothing_written(tmp_path)


def test_damaged_checkpoint_is_refused_and_nothing_written(tmp_path):
    ckpt = checkpoint(tmp_path, "int4-g32-sym")
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimlmError):
        export(ckpt, tmp_path / "m.gguf", format="gguf")
    with pytest.raises(SlimlmError, match="not a slimlm checkpoint"):
        export(tmp_path, tmp_path / "m.gguf", format="gguf")
    assert _nothing_written(tmp_path)


def test_a_failure_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path, "int8-g32-sym")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, tmp_path / "m.gguf", format="gguf")
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("kwargs, message", [({"float_type": "f8"}, "float_type 'f8' is not one of f16, f32"),
                                             ({"requantize": "q4_k"}, "requantize 'q4_k' is not one of q4_0")])
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(SlimlmError, match=message):
        export(tmp_path, tmp_path / "m.gguf", format="gguf", **kwargs)


def test_output_must_be_a_gguf_file_name(tmp_path):
    with pytest.raises(SlimlmError, match="must be a file name ending in .gguf"):
        export(tmp_path, tmp_path / "model", format="gguf")


def test_non_uniform_layer_widths_are_refused(tmp_path):
    model = tiny_model("llama")
    layer = model.model.layers[1].mlp
    with torch.no_grad():  # layer 1 keeps 96 neurons, layer 0 its 128: no single feed_forward_length
        for name in ("gate_proj", "up_proj"):
            old = getattr(layer, name)
            setattr(layer, name, torch.nn.Linear(64, 96, bias=False))
            getattr(layer, name).weight.copy_(old.weight[:96])
        old = layer.down_proj
        layer.down_proj = torch.nn.Linear(96, 64, bias=False)
        layer.down_proj.weight.copy_(old.weight[:, :96])
    with pytest.raises(SlimlmError, match="holds one width for all layers"):
        write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    assert _nothing_written(tmp_path)
