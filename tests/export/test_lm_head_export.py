"""Exports of a model whose tied lm_head was quantized (recipe rtn-int4-g64-head8): untied everywhere."""

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from transformers import AutoModelForCausalLM

from slimlm.api import apply_all
from slimlm.export import export
from slimlm.formats import codec
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.recipe import load_recipe
from tests.export.gguf_util import IDS, decode_blocks


def _ckpt(tmp_path):
    model = tiny_model("llama")  # tie_word_embeddings=True
    apply_all(model, load_recipe("rtn-int4-g64-head8").steps)
    return save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt", base_model="tiny")


def test_gguf_writes_the_int8_channel_head_as_q8_0_code_for_code_and_the_embedding_as_float(tmp_path):
    ckpt = _ckpt(tmp_path)
    path = export(ckpt, tmp_path / "m.gguf", format="gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    model, _ = load_compressed(ckpt)
    head, table = model.lm_head, model.model.embed_tokens.weight.detach()
    out = tensors["output.weight"]
    assert out.tensor_type == QT.Q8_0
    qw = codec.unpack(head.portable_tensors(), head.scheme, head.shape)  # codes (V, d), one scale per row
    q, d, _ = decode_blocks(out.data, out.tensor_type, head.out_features)
    assert torch.equal(torch.from_numpy(q), qw.codes.to(torch.int32))  # code for code
    per_block = qw.scale.float().expand(-1, d.shape[1])  # (V, nb): the row's scale in every block of 32
    assert torch.equal(torch.from_numpy(d.astype(np.float32)), per_block)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(out.data, out.tensor_type)), head.dequantized_weight())
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == QT.F16
    assert torch.equal(torch.from_numpy(np.asarray(emb.data, dtype=np.float32)).reshape(table.shape),
                       table.half().float())  # fmt: skip


def test_hf_export_is_untied_and_holds_the_dequantized_head(tmp_path):
    ckpt = _ckpt(tmp_path)
    out = export(ckpt, tmp_path / "hf", format="hf")
    hf = AutoModelForCausalLM.from_pretrained(out)
    model, _ = load_compressed(ckpt)
    assert hf.config.tie_word_embeddings is False and hf.lm_head.weight is not hf.model.embed_tokens.weight
    assert torch.equal(hf.lm_head.weight.detach(), model.lm_head.dequantized_weight())
    assert torch.equal(hf.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        hidden = hf.model(IDS).last_hidden_state
        assert torch.allclose(hf(IDS).logits, hidden @ model.lm_head.dequantized_weight().T, atol=1e-5)
