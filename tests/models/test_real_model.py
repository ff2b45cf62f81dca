"""The real built-in SmolLM2-135M (converted once into the user's cache, ~20-40 s)."""

import pytest
import torch

from slimlm.models import builtin, load_model, model_info

pytestmark = pytest.mark.real_model

TEXT = "The capital of France is Paris. The capital of Germany is Berlin."


def _mean_nll(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_builtin_smollm2_loads_and_predicts():
    model, tokenizer = load_model("smollm2-135m")
    cfg = model.config
    assert cfg.model_type == "llama" and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    info = model_info(model)
    assert info.tied_embeddings and abs(info.n_params - 134.5e6) < 0.1e6
    assert info.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert _mean_nll(model, tokenizer, TEXT) < 5.0


def test_gguf_file_loads_directly():
    gguf = builtin.gguf_path(builtin.BUILTINS["smollm2-135m"])
    model, tokenizer = load_model(str(gguf), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert getattr(model.config, "quantization_config", None) is None
    assert _mean_nll(model.float(), tokenizer, TEXT) < 5.0
