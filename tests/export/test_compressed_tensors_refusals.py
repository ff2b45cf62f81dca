"""compressed-tensors export: what cannot go out is refused in one line and nothing is written;
bfloat16 scales; the registry entry."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.export import EXPORTERS, export
from slimlm.export.compressed_tensors import export_compressed_tensors
from slimlm.io import WEIGHTS, compressed_modules, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import W8A8Linear
from slimlm.nn.runtime import replace_module
from slimlm.prune import Magnitude
from slimlm.prune.structured_config import PruneWidth
from slimlm.prune.structured_handler import apply_prune_width
from slimlm.quant import RTN
from slimlm.quant.llm_int8 import LLMInt8, apply_llm_int8
from slimlm.quant.w8a8 import W8A8, apply_w8a8
from tests.export.ct_helpers import CALIB, load_hf
from tests.quant.outliers import outlier_llama


def _refused(tmp_path, model, match):
    ck = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    with pytest.raises(SlimlmError, match=match) as e:
        export_compressed_tensors(ck, tmp_path / "ct")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary left behind
    return str(e.value)


@pytest.mark.parametrize("scheme,kind", [("nf4", "NF4Scheme"), ("kmeans3", "KMeansScheme"),
                                         ("ternary", "TernaryScheme"), ("binary", "BinaryScheme")])  # fmt: skip
def test_non_int_weights_are_refused_naming_the_nearest_recipe(tmp_path, scheme, kind):
    model = tiny_model("llama")
    apply(model, RTN(scheme=scheme))
    msg = _refused(tmp_path, model, "nearest exportable recipes: gptq-int4-g64")
    assert kind in msg


def test_activation_formats_it_cannot_hold_are_refused(tmp_path):
    model = tiny_model("llama")
    apply_w8a8(model, W8A8(act_granularity="tensor"))
    _refused(tmp_path / "a", model, "one scale per call.*smoothquant or w8a8-token")
    model = outlier_llama()
    apply_llm_int8(model, LLMInt8(threshold=6.0), CALIB)
    _refused(tmp_path / "b", model, "LLM.int8.*smoothquant or w8a8-token")
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    smoothed = W8A8Linear.from_linear(q, smooth_scale=torch.rand(64) + 0.5)  # divides its input at run time
    replace_module(model, "model.layers.0.self_attn.q_proj", smoothed)
    _refused(tmp_path / "c", model, "smoothing vector at run time")


def test_conv1d_models_and_models_without_quantized_linears_are_refused(tmp_path):
    model = tiny_model("gpt2")
    apply(model, RTN(scheme="int4-g16-sym"))
    _refused(tmp_path / "a", model, "Conv1D.*--format hf or gguf")
    model = tiny_model("llama")
    apply(model, Magnitude(sparsity=0.5))
    _refused(tmp_path / "b", model, "no quantized linears.*--format hf")


def test_shapes_its_config_cannot_state_are_refused_before_writing(tmp_path):
    model = tiny_model("llama")
    apply_prune_width(model, PruneWidth(neurons=48), CALIB)
    mlp = model.model.layers[0].mlp  # layer 0 keeps fewer neurons than the config's intermediate_size says
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            lin.weight = torch.nn.Parameter(lin.weight[:40].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :40].clone())
    _refused(tmp_path, model, "does not match its manifest")


def test_existing_output_needs_overwrite_and_a_damaged_checkpoint_writes_nothing(tmp_path):
    model = tiny_model("llama")
    apply(model, RTN(scheme="int4-g16-sym"))
    ck = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    files = {p.name: p.read_bytes() for p in ck.iterdir()}
    out = export(ck, tmp_path / "ct", format="compressed-tensors")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == files  # the checkpoint is only read
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SlimlmError, match="--overwrite"):
        export_compressed_tensors(ck, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert export_compressed_tensors(ck, out, overwrite=True) == out and (out / "config.json").is_file()
    data = (ck / WEIGHTS).read_bytes()
    (ck / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimlmError, match="corrupt or truncated"):
        export_compressed_tensors(ck, tmp_path / "ct2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ct"]
    assert EXPORTERS["compressed-tensors"] is export_compressed_tensors


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    apply(model, RTN(scheme="int4-g16-sym"))
    ck = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")

    def half_written(self, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(ck, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bfloat16_scales_go_out_exact_and_the_default_path_rounds_them_within_the_bound(tmp_path, caplog):
    model = tiny_model("llama").to(torch.bfloat16)
    apply(model, RTN(scheme="int4-g16-sym"))
    ck = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="slimlm.export"):
        out = export_compressed_tensors(ck, tmp_path / "ct")
    assert "round slimlm's float16 scales to bfloat16" in caplog.text
    name = "model.layers.0.mlp.down_proj"
    assert load_file(str(out / "model.safetensors"))[f"{name}.weight_scale"].dtype == torch.float32
    W = compressed_modules(model)[name].dequantized_weight()  # float32, exact
    exact = load_hf(out, dequantize=True)
    assert exact.dtype == torch.bfloat16 and torch.equal(exact.get_submodule(name).weight, W.to(torch.bfloat16))
    default = load_hf(out, dequantize=False)
    default(torch.tensor([[5, 6]]))  # the first forward decompresses
    got = default.get_submodule(name).weight.float()
    # the scale rounded to bfloat16 (8 significant bits: <= 2^-8 relative), then the product (<= 2^-8 again)
    assert bool(((got - W).abs() <= (2**-7 + 2**-16) * W.abs()).all())
    assert float(((got - W).abs() / W.abs().clamp(min=1e-30)).max()) > 2**-9  # and the bound is not loose by 4x
    assert not torch.equal(got, W.to(torch.bfloat16).float())  # the rounding is real: exact needs dequantize=True
