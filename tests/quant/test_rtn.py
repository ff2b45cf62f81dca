import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerChannel, PerGroup, fake_quantize
from slimlm.models.tiny import tiny_model
from slimlm.nn import QuantLinear
from slimlm.quant import RTN
from slimlm.targets import Targets

IDS = torch.arange(3, 43).reshape(2, 20)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_rtn_swaps_every_block_linear_and_matches_fake_quantization():
    model, ref = tiny_model("llama"), tiny_model("llama")
    W = ref.model.layers[0].self_attn.q_proj.weight.detach().clone()
    scheme = IntScheme(bits=4, granularity=PerGroup(16))
    apply(model, RTN(scheme=scheme))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear)
    assert torch.equal(q.dequantized_weight().float(), fake_quantize(W, scheme))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert not isinstance(model.lm_head, QuantLinear)


def test_more_bits_less_error():
    base = _logits(tiny_model("llama"))
    errs = {}
    for bits in (8, 4, 3):
        model = tiny_model("llama")
        apply(model, RTN(scheme=IntScheme(bits=bits, symmetric=bits == 8, granularity=PerChannel())))
        errs[bits] = _rel_err(_logits(model), base)
    assert errs[8] < 0.01 and errs[8] < errs[4] < errs[3]


def test_overrides_and_lm_head():
    model = tiny_model("llama")
    apply(model, RTN(scheme="int4-g16", overrides=(("*.down_proj", "int8-channel-sym"),), targets=Targets(lm_head=True)))
    assert model.model.layers[0].mlp.down_proj.scheme.bits == 8
    assert model.model.layers[0].mlp.up_proj.scheme.bits == 4
    assert isinstance(model.lm_head, QuantLinear)
    assert model(IDS).logits.shape == (2, 20, 512)


def test_bad_group_size_is_refused_before_anything_changes():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(SlimlmError, match="does not divide in_features 64; valid: .*32, 64"):
        apply(model, RTN(scheme="int4-g48"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_gpt2_conv1d_is_quantized():
    model = tiny_model("gpt2")
    base = _logits(model)
    apply(model, RTN(scheme="int8-channel-sym"))
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)
    assert _rel_err(_logits(model), base) < 0.02


def test_unknown_config_is_refused():
    with pytest.raises(SlimlmError, match="known configs: RTN"):
        apply(tiny_model("llama"), object())


def test_nan_weights_are_refused_with_the_module_name():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SlimlmError, match=r"model.layers.1.mlp.up_proj holds 1 NaN/Inf"):
        apply(model, RTN(scheme="int8-channel-sym"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
