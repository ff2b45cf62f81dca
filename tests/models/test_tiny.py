import pytest
import torch
from transformers import AutoTokenizer

from slimlm.models import TINY_FAMILIES, load_model, save_tiny_model_dir, tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 40, 70, 100, 300, 7, 2]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_models_are_deterministic_per_seed(family):
    a, b, c = tiny_model(family, seed=3), tiny_model(family, seed=3), tiny_model(family, seed=4)
    assert not a.training and a.dtype == torch.float32
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)
    assert not torch.equal(_logits(a), _logits(c))


def test_tiny_models_use_gqa_where_supported():
    for family in ("llama", "mistral", "qwen2", "gemma", "gemma3_text"):
        cfg = tiny_model(family).config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (4, 2, 2)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


def test_tiny_tokenizer_round_trips_and_fits_the_model(tmp_path):
    tok = tiny_tokenizer()
    text = "The capital of France is Paris. ünïcode 123 </s>"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert max(ids) < 512 and len(tok) <= 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == ids
    assert again.eos_token == "</s>"


def test_load_model_on_saved_tiny_dir_gives_identical_logits(tmp_path):
    for family in ("llama", "gpt2", "gemma3"):
        path = save_tiny_model_dir(tmp_path / family, family, seed=5)
        model, tok = load_model(str(path))
        assert not model.training
        torch.testing.assert_close(_logits(model), _logits(tiny_model(family, seed=5)), rtol=0, atol=0)
        assert tok("hello world").input_ids == tiny_tokenizer()("hello world").input_ids
