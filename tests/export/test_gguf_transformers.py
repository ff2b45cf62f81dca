"""GGUF export read back by transformers' own GGUF loader (model and tokenizer) and checked key by key."""

import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.api import apply, apply_all, needs_calibration
from slimlm.export import export
from slimlm.export.gguf import GGUFOptions, write_gguf
from slimlm.io import dequantized_copy, load_compressed
from slimlm.models.tiny import tiny_config, tiny_model
from slimlm.prune.structured_config import PruneDepth, PruneWidth
from slimlm.recipe import load_recipe, shipped_recipes
from slimlm.targets import Targets
from tests.export.gguf_util import IDS, SAMPLE, checkpoint

CALIB = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0))


def _both(tmp_path, ckpt, **options):
    """(logits of transformers' GGUF load, logits of slimlm's dequantized checkpoint, the GGUF path)."""
    path = export(ckpt, tmp_path / "m.gguf", format="gguf", **options)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ours, _ = load_compressed(ckpt)
    dequantized_copy(ours)
    with torch.no_grad():
        return theirs(IDS).logits, ours(IDS).logits, path


@pytest.mark.parametrize("scheme", ["int4-g32-sym", "int8-g32-sym", "int5-g64-sym"])
def test_transformers_logits_equal_slimlm_for_exact_grids(tmp_path, scheme):
    theirs, ours, _ = _both(tmp_path, checkpoint(tmp_path, scheme), float_type="f32")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_asymmetric_grid_differs_only_by_the_rounding_of_m(tmp_path):
    theirs, ours, _ = _both(tmp_path, checkpoint(tmp_path, "int4-g32"), float_type="f32")
    err = (theirs - ours).abs().max()
    assert 0 < err < 0.01 * ours.abs().max()  # < 0.75% of a step per weight; a sign error in m is O(1)


def test_tied_model_has_no_output_tensor_and_loads_tied(tmp_path):
    theirs, ours, path = _both(tmp_path, checkpoint(tmp_path, "int4-g32-sym"), float_type="f32")
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert "output.weight" not in names and names.count("token_embd.weight") == 1
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_untied_and_quantized_lm_heads_are_written(tmp_path):
    config = tiny_config("llama")
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untied = AutoModelForCausalLM.from_config(config).eval()
    cases = [("untied", untied, False, QT.F32), ("qhead", tiny_model("llama"), True, QT.Q4_0)]
    for name, model, lm_head, want in cases:
        ckpt = checkpoint(tmp_path, "int4-g32-sym", model=model, name=name, targets=Targets(lm_head=lm_head))
        theirs, ours, path = _both(tmp_path / f"{name}-gguf", ckpt, float_type="f32")
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert types["output.weight"] == want and types["token_embd.weight"] == QT.F32
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_from_the_gguf_encodes_like_the_checkpoint_s(tmp_path, add_bos):
    ckpt = checkpoint(tmp_path, "int8-g32-sym", add_bos=add_bos)
    path = export(ckpt, tmp_path / "m.gguf", format="gguf")
    _, ours = load_compressed(ckpt)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert theirs(SAMPLE).input_ids == ours(SAMPLE).input_ids
    assert (ours(SAMPLE).input_ids[0] == ours.bos_token_id) == add_bos
    assert theirs.decode(theirs(SAMPLE).input_ids, skip_special_tokens=True) == SAMPLE


def _field(reader, key):
    return reader.fields[key].contents()


def test_metadata_keys(tmp_path):
    ckpt = checkpoint(tmp_path, "int4-g32-sym")
    r = gguf.GGUFReader(export(ckpt, tmp_path / "m.gguf", format="gguf"))
    model, tok = load_compressed(ckpt)
    c = model.config
    want = {"general.architecture": "llama", "general.name": "tiny", "general.file_type": 2,
            "general.quantization_version": 2, "llama.block_count": 2, "llama.context_length": 256,
            "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16, "llama.rope.dimension_count": 16,
            "llama.vocab_size": 512, "llama.rope.freq_base": c.rope_parameters["rope_theta"],
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False}  # fmt: skip
    assert {k: _field(r, k) for k in want} == want
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(512)]
    assert types[:4] == [3, 3, 3, 3] and set(types[4:]) == {1}  # specials CONTROL, the rest NORMAL
    assert len(_field(r, "tokenizer.ggml.merges")) == 512 - 4 - 256


@pytest.mark.parametrize("float_type, embd, want_file", [("f16", QT.F16, 1), ("bf16", QT.BF16, 32),
                                                         ("q8_0", QT.Q8_0, 7), ("f32", QT.F32, 0)])  # fmt: skip
def test_float_types(tmp_path, float_type, embd, want_file):
    ckpt = checkpoint(tmp_path, None)  # a float model: everything goes by float_type
    path = export(ckpt, tmp_path / "m.gguf", format="gguf", float_type=float_type)
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == embd and types["blk.0.attn_q.weight"] == embd
    assert types["blk.0.attn_norm.weight"] == QT.F32 and types["output_norm.weight"] == QT.F32  # norms stay F32
    assert _field(r, "general.file_type") == want_file
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ours, _ = load_compressed(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=0, atol=0.05)


@pytest.mark.parametrize("config", [PruneWidth(heads=0.5, neurons=64), PruneDepth(layers=1)], ids=["width", "depth"])
def test_structurally_pruned_model_exports_with_its_new_shapes(tmp_path, config):
    model = apply(tiny_model("llama"), config, CALIB)
    ckpt = checkpoint(tmp_path, "int4-g32-sym", model=model)
    theirs, ours, path = _both(tmp_path, ckpt, float_type="f32")
    r = gguf.GGUFReader(path)
    c = model.config
    assert _field(r, "llama.attention.head_count") == c.num_attention_heads
    assert _field(r, "llama.feed_forward_length") == c.intermediate_size
    assert _field(r, "llama.block_count") == c.num_hidden_layers
    assert sum(t.name.endswith("attn_q.weight") for t in r.tensors) == c.num_hidden_layers
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    if isinstance(config, PruneWidth):  # head_dim no longer hidden / heads: the file must say it
        assert c.num_attention_heads == 2 and c.intermediate_size == 64
        assert _field(r, "llama.attention.key_length") == 16 != c.hidden_size // c.num_attention_heads


def test_file_type_names_the_most_common_block_type(tmp_path):
    model = tiny_model("llama")
    ckpt = checkpoint(tmp_path, "int4-g32", model=model, overrides=(("*.down_proj", "int8-g32-sym"),))
    r = gguf.GGUFReader(export(ckpt, tmp_path / "m.gguf", format="gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == QT.Q8_0 and types["blk.0.ffn_up.weight"] == QT.Q4_1
    assert _field(r, "general.file_type") == 3  # MOSTLY_Q4_1
    assert np.isfinite(gguf.quants.dequantize(r.tensors[3].data, r.tensors[3].tensor_type)).all()


@pytest.mark.parametrize("recipe", ["gptq-q4_0", "gptq-q4_1", "awq-q4_1", "rtn-q8_0"])
def test_gguf_recipes_export_code_for_code_to_the_type_they_name(tmp_path, recipe):
    spec = load_recipe(recipe)
    first_line = shipped_recipes()[recipe].read_text().splitlines()[0]
    want = re.search(r"code for code to GGUF (Q\d_\d)", first_line).group(1)
    model = apply_all(tiny_model("llama"), list(spec.steps), CALIB if needs_calibration(spec.steps) else None)
    ckpt = checkpoint(tmp_path, None, model=model)
    model, tok = load_compressed(ckpt)
    report = write_gguf(model, tok, tmp_path / "m.gguf", options=GGUFOptions(float_type="f32"))
    linears = [t for t in report.tensors if t.name.startswith("blk.") and not t.name.endswith("norm.weight")]
    assert len(linears) == 14 and {(t.how, t.type) for t in linears} == {("codes", want)}
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    dequantized_copy(model)
    with torch.no_grad():
        tol = 1e-5 if want != "Q4_1" else 0.01 * model(IDS).logits.abs().max().item()
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, rtol=0, atol=tol)


def test_mistral_without_sliding_window_goes_out_as_llama(tmp_path):
    model = tiny_model("mistral")
    assert model.config.sliding_window is None and not model.config.tie_word_embeddings
    theirs, ours, path = _both(tmp_path, checkpoint(tmp_path, "int8-g32-sym", model=model), float_type="f32")
    assert _field(gguf.GGUFReader(path), "general.architecture") == "llama"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
