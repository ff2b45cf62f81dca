import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimlm.models import HeadLayout, TINY_FAMILIES, format_info, model_info, tiny_model


def test_tied_embeddings_counted_once():
    model = tiny_model("llama")  # tie_word_embeddings=True
    info = model_info(model)
    assert info.tied_embeddings
    emb = model.get_input_embeddings().weight
    naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert info.n_params == naive - emb.numel()
    assert info.n_params == sum(p.numel() for p in set(model.parameters()))


def test_bytes_are_params_plus_real_buffers():
    for family in TINY_FAMILIES:
        model = tiny_model(family)
        tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        expected = sum(t.numel() * t.element_size() for t in tensors.values())
        assert model_info(model).size_bytes == expected, family
    half = tiny_model("mistral").to(torch.bfloat16)
    info = model_info(half)
    assert info.dtype == "bfloat16"
    buffers = sum(b.numel() * b.element_size() for b in half.buffers())
    assert info.size_bytes == info.n_params * 2 + buffers


def test_numbers_and_linears():
    info = model_info(tiny_model("llama"))
    assert (info.architecture, info.model_type, info.n_layers) == ("LlamaForCausalLM", "llama", 2)
    assert info.heads == HeadLayout(4, 2, 16)
    assert info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    names = [li.name for li in info.linears]
    assert len(names) == 2 * 7 + 1 and names[-1] == "lm_head"
    assert ("model.layers.0.self_attn.k_proj", 64, 32, "float32") in info.linears


def test_conv1d_linears_listed_with_true_in_out():
    model = tiny_model("gpt2")
    info = model_info(model)
    conv = sum(isinstance(m, Conv1D) for m in model.modules())
    linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(info.linears) == conv + linear == 9
    assert ("transformer.h.0.attn.c_attn", 64, 192, "float32") in info.linears
    assert ("transformer.h.0.mlp.c_proj", 128, 64, "float32") in info.linears


def test_format_info_is_a_readable_table():
    text = format_info(model_info(tiny_model("gemma3")))
    assert "Gemma3ForConditionalGeneration (gemma3)" in text
    assert "4 query, 2 kv, head dim 16" in text
    assert "model.language_model.layers.1.mlp.down_proj" in text
    short = format_info(model_info(tiny_model("gemma3")), linears=False)
    assert "down_proj" not in short and len(short.splitlines()) < 12
