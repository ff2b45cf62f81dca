"""Fused quantized q/k/v and gate/up in the fast decoder (slimlm.nn.fused_quant): same logits and greedy tokens
as one kernel call per linear, the fused path really taken, fallbacks for mixed layers, weights held once."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.formats import parse_scheme
from slimlm.generation import GenerationConfig, generate
from slimlm.generation.decoder import FastDecoder
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_config, tiny_tokenizer
from slimlm.nn import QuantLinear
from slimlm.nn.fused_quant import FusedQuantLinear, fusable
from slimlm.quant import RTN

from .conftest import varied_tiny

IDS = torch.tensor([[5, 17, 99, 230, 41, 8, 300, 77, 12, 450, 64, 3]])  # (1, 12)
PARTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _quantized(scheme: str, family: str = "llama", model=None):
    model = model if model is not None else varied_tiny(family)
    return apply(model, RTN(scheme=parse_scheme(scheme)))


def _logits(dec, ids=IDS, cuts=(7, 8)):
    """Prefill then one- and multi-token chunks through one cache: (1, T, V)."""
    cache = dec.new_cache(ids.shape[0], 32)
    bounds = (0, *cuts, ids.shape[1])
    pos = torch.arange(ids.shape[1])[None]
    return torch.cat([dec(ids[:, a:b], pos[:, a:b], cache) for a, b in zip(bounds, bounds[1:])], dim=1)


def _greedy(dec, n=16):
    return generate(dec, [IDS[0].tolist()], GenerationConfig(max_new_tokens=n))[0]


def _part_calls(model) -> list[str]:
    """Names of q/k/v/gate/up modules called from now on (forward hooks)."""
    called = []
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in PARTS:
            m.register_forward_hook(lambda mod, args, out, name=name: called.append(name))
    return called


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64", "int8-channel-sym", "int4-g16"])
def test_fused_equals_unfused_and_is_taken(scheme, monkeypatch):
    model = _quantized(scheme)
    plain, fused = FastDecoder(model, fuse=False), FastDecoder(model, fuse=True)
    assert all(isinstance(f, FusedQuantLinear) for layer in fused.layers for f in (layer.qkv, layer.gate_up))
    assert not any(isinstance(f, FusedQuantLinear) for layer in plain.layers for f in (layer.qkv, layer.gate_up))
    ref_logits, ref_tokens = _logits(plain), _greedy(plain)
    calls = []
    real = FusedQuantLinear._matmul
    monkeypatch.setattr(FusedQuantLinear, "_matmul", lambda self, x: calls.append(self.shape) or real(self, x))
    parts_called = _part_calls(model)
    torch.testing.assert_close(_logits(fused), ref_logits, atol=1e-6, rtol=1e-6)
    assert _greedy(fused) == ref_tokens and len(set(ref_tokens)) > 2  # varied continuation, not a repeat
    assert parts_called == []  # q/k/v/gate/up never ran one by one
    n_layers = len(fused.layers)
    assert len(calls) >= 2 * n_layers and len(calls) % (2 * n_layers) == 0  # two fused matmuls per layer per step
    assert set(calls) == {(64 + 2 * 32, 64), (2 * 128, 64)}  # (q+k+v, in) and (gate+up, in)


def test_biases_concatenated_with_zeros_for_parts_without_one():
    model = varied_tiny("qwen2")  # q/k/v with biases, gate/up without
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            lin.bias.data = torch.randn(lin.bias.shape, generator=g)
        k = layer.self_attn.k_proj
        layer.self_attn.k_proj = nn.Linear(k.in_features, k.out_features, bias=False)  # k: no bias
        layer.self_attn.k_proj.weight.data = k.weight.data.clone()
    _quantized("int4-g32", model=model)
    plain, fused = FastDecoder(model, fuse=False), FastDecoder(model, fuse=True)
    assert isinstance(fused.layers[0].qkv, FusedQuantLinear) and fused.layers[0].qkv.bias is not None
    assert fused.layers[0].gate_up.bias is None
    torch.testing.assert_close(_logits(fused), _logits(plain), atol=1e-6, rtol=1e-6)
    assert _greedy(fused) == _greedy(plain)


def _requantize(linear: QuantLinear, scheme: str) -> QuantLinear:
    float_lin = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    float_lin.weight.data = linear.dequantized_weight()
    return QuantLinear.from_linear(float_lin, parse_scheme(scheme))


def _to_float(linear: QuantLinear) -> nn.Linear:
    float_lin = nn.Linear(linear.in_features, linear.out_features, bias=False)
    float_lin.weight.data = linear.dequantized_weight()
    return float_lin


@pytest.mark.parametrize("mix", ["v float", "k other group size", "up per-tensor int8"])
def test_mixed_parts_fall_back_per_module_and_match(mix):
    model = _quantized("int4-g32" if mix != "up per-tensor int8" else "int8-channel-sym")
    layer = model.model.layers[0]
    if mix == "v float":
        layer.self_attn.v_proj = _to_float(layer.self_attn.v_proj)
    elif mix == "k other group size":
        layer.self_attn.k_proj = _requantize(layer.self_attn.k_proj, "int4-g64")
    else:
        layer.mlp.up_proj = _requantize(layer.mlp.up_proj, "int8-tensor-sym")
    plain, fused = FastDecoder(model, fuse=False), FastDecoder(model, fuse=True)
    mixed = fused.layers[0].gate_up if mix.startswith("up") else fused.layers[0].qkv
    assert not isinstance(mixed, FusedQuantLinear)
    assert isinstance(fused.layers[1].qkv, FusedQuantLinear)  # the other layer still fuses
    with torch.no_grad():
        hf = model(IDS).logits
    torch.testing.assert_close(_logits(fused), _logits(plain), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(fused), hf, atol=1e-4, rtol=1e-3)


def test_fusable_refuses_what_does_not_concatenate():
    model = _quantized("int8-tensor-sym")  # one scale per tensor: rows do not carry their own scale
    attn = model.model.layers[0].self_attn
    assert "per-row or per-group" in fusable([attn.q_proj, attn.k_proj, attn.v_proj])
    model = _quantized("nf4")
    attn = model.model.layers[0].self_attn
    assert "per-row or per-group" in fusable([attn.q_proj, attn.k_proj, attn.v_proj])
    assert fusable([attn.q_proj]) is not None


def _wide_llama():
    """hidden 128, 4 heads of 32, 2 KV heads: q 128, k 64, v 64, gate/up 256 rows (whole 64-row blocks)."""
    cfg = tiny_config("llama")
    cfg.update(dict(hidden_size=128, intermediate_size=256, head_dim=32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _holds_view_of(part: QuantLinear, fused: FusedQuantLinear, key: str) -> bool:
    return part._weight[key].untyped_storage().data_ptr() == fused._weight[key].untyped_storage().data_ptr()


def test_parts_hold_views_of_the_fused_weight_and_stay_saveable(tmp_path):
    model = _quantized("int4-g64", model=_wide_llama())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dec = FastDecoder(model)
    for layer, block in zip(dec.layers, model.model.layers):
        for fused, parts in ((layer.qkv, ("q_proj", "k_proj", "v_proj")), (layer.gate_up, ("gate_proj", "up_proj"))):
            mods = [getattr(block.self_attn if p.endswith(("q_proj", "k_proj", "v_proj")) else block.mlp, p)
                    for p in parts]
            assert all(_holds_view_of(m, fused, k) for m in mods for k in ("codes", "scale", "zero", "int4pack"))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _ = load_compressed(out)
    torch.testing.assert_close(_logits(FastDecoder(loaded)), _logits(dec), atol=0, rtol=0)
    torch.testing.assert_close(_logits(FastDecoder(model, fuse=False)), _logits(dec), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rows", [(576, 192, 192), (1536, 1536)])
def test_smollm2_row_counts_share_the_int4pack_layout(rows):
    """torch's CPU int4pack of stacked rows is the stack of the parts' layouts for SmolLM2's q/k/v and gate/up
    row counts (whole 64-row blocks), so no second copy of the weights is kept."""
    g = torch.Generator().manual_seed(0)
    mods = [QuantLinear.from_linear(nn.Linear(64, n, bias=False), parse_scheme("int4-g64")) for n in rows]
    assert mods[0].kernel.name == "int4_grouped_cpu"
    fused = FusedQuantLinear(mods)
    assert fused.shared == {i: ["codes", "scale", "zero", "int4pack"] for i in range(len(rows))}
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], dim=-1), atol=0, rtol=0)


def test_fuse_false_leaves_the_parts_alone():
    model = _quantized("int4-g32", model=_wide_llama())
    q = model.model.layers[0].self_attn.q_proj
    own = {k: v.data_ptr() for k, v in q._weight.items()}
    FastDecoder(model, fuse=False)
    assert {k: v.data_ptr() for k, v in q._weight.items()} == own


def test_kernel_report_names_the_fused_matmuls():
    model = _quantized("int4-g32")
    report = FastDecoder(model).kernel_report()
    names = [layer.layer for layer in report.layers]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj (fused)" in names
    assert "model.layers.1.mlp.gate_proj+up_proj (fused)" in names
    assert "model.layers.0.self_attn.o_proj" in names and "model.layers.0.self_attn.q_proj" not in names
    assert len(names) == 4 * len(model.model.layers)  # qkv, o, gate_up, down
    assert report.counts == {"int4_grouped_cpu": len(names)}
    plain = FastDecoder(model, fuse=False).kernel_report()
    assert len(plain.layers) == 7 * len(model.model.layers)
