"""Exports of a model whose embedding reads the quantized lm_head's table (embedding: shared)."""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.export import export
from slimlm.formats import codec
from slimlm.io import dequantized_copy, load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.quant import RTN
from slimlm.targets import Targets
from tests.export.ct_helpers import dequantized_logits, load_hf, logits
from tests.export.gguf_util import IDS, decode_blocks


def _ckpt(tmp_path, head="int8-channel-sym", scheme="int4-g32-sym"):
    model = tiny_model("llama")
    apply(model, RTN(scheme=scheme, targets=Targets(lm_head=head, embedding="shared")))
    return save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")


@torch.no_grad()
def _ours(ckpt):
    """slimlm's checkpoint with every table dequantized, and its logits."""
    model, _ = load_compressed(ckpt)
    dequantized_copy(model)
    return model, model(IDS).logits


def test_hf_export_is_one_float_table_tied_again(tmp_path):
    ckpt = _ckpt(tmp_path)
    table = load_compressed(ckpt)[0].lm_head.dequantized_weight()
    out = export(ckpt, tmp_path / "hf", format="hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert torch.equal(hf.model.embed_tokens.weight.detach(), table)
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, _ours(ckpt)[1])


@pytest.mark.parametrize("head,qtype", [("int8-channel-sym", QT.Q8_0), ("int4-g32-sym", QT.Q4_0)])
def test_gguf_writes_one_quantized_token_embd_code_for_code_and_no_output(tmp_path, head, qtype):
    ckpt = _ckpt(tmp_path, head)
    path = export(ckpt, tmp_path / "m.gguf", format="gguf", float_type="f32")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # llama.cpp multiplies by token_embd
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == qtype
    lm_head = load_compressed(ckpt)[0].lm_head
    qw = codec.unpack(lm_head.portable_tensors(), lm_head.scheme, lm_head.shape)
    q, _, _ = decode_blocks(emb.data, emb.tensor_type, lm_head.out_features)
    offset = 8 if qtype == QT.Q4_0 else 0
    assert torch.equal(torch.from_numpy(q), qw.codes.to(torch.int32) + offset)  # code for code
    table = torch.from_numpy(gguf.quants.dequantize(emb.data, emb.tensor_type))
    assert torch.equal(table, lm_head.dequantized_weight())
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, _ours(ckpt)[1], rtol=1e-5, atol=1e-5)


def test_gguf_of_a_head_no_type_holds_writes_the_table_in_float_and_the_head_as_asked(tmp_path):
    ckpt = _ckpt(tmp_path, head="int3-g32")
    with pytest.raises(SlimlmError, match="lm_head .* has no GGUF type that holds it code for code"):
        export(ckpt, tmp_path / "m.gguf", format="gguf")
    path = export(ckpt, tmp_path / "m.gguf", format="gguf", float_type="f32", requantize="q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == QT.F32 and tensors["output.weight"].tensor_type == QT.Q4_0
    got = torch.from_numpy(np.array(emb.data, dtype=np.float32)).reshape(512, 64)
    assert torch.equal(got, load_compressed(ckpt)[0].lm_head.dequantized_weight())


def test_compressed_tensors_writes_the_table_as_a_float_embedding_beside_the_quantized_head(tmp_path):
    ckpt = _ckpt(tmp_path, scheme="int4-g16-sym")
    model, _ = load_compressed(ckpt)
    out = export(ckpt, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    # transformers' default path (dequantize=True misreads any quantized lm_head, shared or not, in 5.x)
    hf = load_hf(out, dequantize=False)
    assert torch.equal(hf.model.embed_tokens.weight.detach(), model.lm_head.dequantized_weight())
    assert torch.equal(logits(hf), dequantized_logits(model))
