import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.io import MANIFEST, WEIGHTS, export_hf, load_compressed, save_compressed
from slimlm.models import load_model
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import QuantLinear
from slimlm.quant import RTN

IDS = torch.arange(3, 35).reshape(1, 32)
SCHEMES = ["int8-channel-sym", "int4-g16", "int3-g32", "nf4-dq", "kmeans3", "ternary", "binary"]


def _compressed(scheme, family="llama"):
    model = tiny_model(family)
    apply(model, RTN(scheme=scheme))
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_is_bit_identical(tmp_path, scheme):
    model = _compressed(scheme)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt", base_model="tiny", recipe={"x": 1})
    loaded, tok = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["base_model"] == "tiny" and len(manifest["modules"]) == 14
    assert tok("hello").input_ids == tiny_tokenizer()("hello").input_ids


def test_gpt2_round_trip_and_load_model_dispatch(tmp_path):
    model = _compressed("int4-g16", family="gpt2")
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "g")
    loaded, _ = load_model(str(out))  # load_model recognises a slimlm checkpoint
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_size_on_disk_reflects_the_bits(tmp_path):
    sizes = {}
    for scheme in ("int8-channel-sym", "int4-g16"):
        model = tiny_model("llama", vocab_size=512)
        apply(model, RTN(scheme=scheme))
        out = save_compressed(model, None, tmp_path / scheme)
        sizes[scheme] = (out / WEIGHTS).stat().st_size
    dense = tiny_model("llama")
    linears = sum(m.weight.numel() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    assert sizes["int8-channel-sym"] - sizes["int4-g16"] == pytest.approx(linears * (1 - 0.5 - 2 * 2 / 16), rel=0.1)


def test_existing_output_is_not_overwritten(tmp_path):
    model = _compressed("int8-channel-sym")
    out = save_compressed(model, None, tmp_path / "c")
    before = (out / WEIGHTS).read_bytes()
    with pytest.raises(SlimlmError, match="--overwrite"):
        save_compressed(_compressed("int4-g16"), None, out)
    assert (out / WEIGHTS).read_bytes() == before
    save_compressed(_compressed("int4-g16"), None, out, overwrite=True)
    assert (out / WEIGHTS).read_bytes() != before


def test_damaged_checkpoints_get_clear_errors(tmp_path):
    out = save_compressed(_compressed("int4-g16"), tiny_tokenizer(), tmp_path / "c")
    data = (out / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimlmError, match="corrupt or truncated"):
        load_compressed(out)
    (out / WEIGHTS).unlink()
    (out / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SlimlmError, match="never loads pickle"):
        load_compressed(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(SlimlmError, match="damaged"):
        load_compressed(out)


def test_export_hf_loads_in_stock_transformers(tmp_path):
    model = _compressed("int4-g16")
    ckpt = save_compressed(model, tiny_tokenizer(), tmp_path / "c")
    out = export_hf(ckpt, tmp_path / "hf")
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, QuantLinear) for m in stock.modules())
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_info_of_a_compressed_model_counts_packed_weights():
    from slimlm.models import model_info

    info, dense = model_info(_compressed("int4-g16")), model_info(tiny_model("llama"))
    assert info.n_params == dense.n_params and info.size_bytes < dense.size_bytes
    assert sum(lin.dtype == "int4-g16" for lin in info.linears) == 14


def test_unknown_manifest_version_and_mismatched_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_compressed(_compressed("int4-g16"), tiny_tokenizer(), tmp_path / "c")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(dict(manifest, format="slimlm.checkpoint/99")))
    with pytest.raises(SlimlmError, match="this slimlm reads slimlm.checkpoint/1"):
        load_compressed(out)
    (out / MANIFEST).write_text(json.dumps(manifest))
    tensors = load_file(str(out / WEIGHTS))
    tensors.pop(next(k for k in tensors if k.endswith("q_proj.scale")))
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "slimlm.checkpoint/1"})
    with pytest.raises(SlimlmError, match="does not match its manifest"):
        load_compressed(out)
