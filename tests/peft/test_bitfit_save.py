"""BitFit with zero_biases: the added biases are declared in the config, so the model saves and reloads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer
from slimlm.peft import BitFit
from slimlm.pipelines.compress import compress
from slimlm.quant.rtn import RTN
from slimlm.recipe import recipe_from_dict
from slimlm.targets import Targets
from tests.peft.helpers import FAST, learnable_calib, model, snapshot

CALIB = learnable_calib()
IDS = torch.arange(4, 36).reshape(1, 32)
ATTENTION = Targets(include=("*.self_attn.*",))


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


def _trained(m, config=BitFit(zero_biases=True, lr=5e-2, **FAST), part="_proj"):
    apply(m, config, CALIB)
    biases = [m_.bias for n, m_ in m.named_modules() if n.endswith("_proj") and part in n]
    assert all(b is not None for b in biases) and any(b.abs().sum() > 0 for b in biases)  # trained, not zeros
    return m


def test_llama_with_zero_biases_reloads_through_slimlm_and_transformers(tmp_path):
    m = _trained(model())
    assert m.config.attention_bias is True and m.config.mlp_bias is True
    out = save_compressed(m, tiny_tokenizer(), tmp_path / "b")
    assert torch.equal(_logits(load_compressed(out)[0]), _logits(m))
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.model.layers[0].mlp.down_proj.bias is not None
    torch.testing.assert_close(_logits(stock), _logits(m), rtol=0, atol=1e-6)


def test_attention_only_biases_set_only_attention_bias_and_reload(tmp_path):
    m = _trained(model(), BitFit(zero_biases=True, targets=ATTENTION, lr=5e-2, **FAST), part="self_attn")
    assert m.config.attention_bias is True and m.config.mlp_bias is False
    out = save_compressed(m, tiny_tokenizer(), tmp_path / "b")
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.model.layers[0].mlp.up_proj.bias is None
    torch.testing.assert_close(_logits(stock), _logits(m), rtol=0, atol=1e-6)


def test_biases_on_a_quantized_base_reload_through_slimlm(tmp_path):
    m = apply(model(), RTN(scheme="int4-g32"))
    _trained(m)
    out = save_compressed(m, tiny_tokenizer(), tmp_path / "q")
    assert torch.equal(_logits(load_compressed(out)[0]), _logits(m))


@pytest.mark.parametrize("family, targets, pattern", [
    ("llama", Targets(include=("*.q_proj", "*.k_proj", "*.v_proj")),
     r"add a bias to model.layers.0.self_attn.q_proj but not to model.layers.0.self_attn.o_proj; attention_bias"),
    ("llama", Targets(include=("*.mlp.*",), exclude=("model.layers.1.*",)), r"but not to model.layers.1.mlp.gate_proj"),
    ("llama", Targets(include=("*.self_attn.*",), lm_head=True), r"add a bias to lm_head, which the llama config"),
    ("qwen3", Targets(), r"add a bias to model.layers.0.mlp.gate_proj, which the qwen3 config \(attention_bias\)"),
    ("mistral", Targets(), r"the mistral config \(no bias flag\) cannot declare"),
])
def test_a_bias_set_the_config_cannot_declare_is_refused_and_nothing_changes(family, targets, pattern):
    m = tiny_model(family)
    before, config = snapshot(m), m.config.to_dict()
    with pytest.raises(SlimlmError, match=pattern) as e:
        apply(m, BitFit(zero_biases=True, targets=targets, **FAST), CALIB)
    assert "\n" not in str(e.value)
    after = snapshot(m)
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert m.config.to_dict() == config


def test_compress_runs_a_zero_biases_bitfit_recipe(tmp_path):
    src = str(save_tiny_model_dir(tmp_path / "m", "llama"))
    rec = recipe_from_dict({"name": "bitfit", "steps": [{"method": "bitfit", "zero_biases": True, "steps": 2,
                                                          "seq_len": 32, "batch_size": 2, "samples": 4}]})
    report = compress(src, rec, out=tmp_path / "o", protocol="pydoc-v1", tokens=512, speed=False)
    assert report.compressed.training[0]["method"] == "bitfit"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").model.layers[0].self_attn.o_proj.bias is not None


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma2", "gemma3"])
def test_attention_bias_families_reload_attention_biases_in_transformers(tmp_path, family):
    m = tiny_model(family)
    apply(m, BitFit(zero_biases=True, targets=ATTENTION, lr=5e-2, **FAST), CALIB)
    out = save_compressed(m, tiny_tokenizer(), tmp_path / family)
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert sum(n.endswith("o_proj.bias") for n, _ in stock.named_parameters()) == 2
    torch.testing.assert_close(_logits(stock), _logits(m), rtol=0, atol=1e-5)
