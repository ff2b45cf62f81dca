"""Native kernels inside a model: fused q/k/v and gate/up hold their weights once and match the parts, checkpoints
are the bytes the torch kernels write, and a compiled decode step keeps the native op in its graph."""

from __future__ import annotations

import pytest
import torch

from slimlm.api import apply
from slimlm.formats import parse_scheme
from slimlm.generation.decoder import FastDecoder, make_decoder
from slimlm.generation.compiled import compile_step
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.io import load_compressed, save_compressed
from slimlm.kernels.native import build
from slimlm.models.tiny import tiny_tokenizer
from slimlm.nn.fused_quant import FusedQuantLinear
from slimlm.quant import RTN
from tests.generation.conftest import varied_tiny
from tests.generation.test_loop import PROMPTS

# 3/4-bit per channel: torch's int4 kernel takes the grouped ones (kernels/select.py), the native one these
NATIVE = {"int4-channel": "int4_native_cpu", "int3-channel-sym": "int4_native_cpu", "int8-g32-sym": "int8_native_cpu",
          "int8-g16": "int8_native_cpu"}  # fmt: skip


def _quantized(scheme: str):
    return apply(varied_tiny("llama"), RTN(scheme=parse_scheme(scheme)))


def _logits(dec, ids):
    cache = dec.new_cache(ids.shape[0], 32)
    pos = torch.arange(ids.shape[1])[None]
    return torch.cat([dec(ids[:, :5], pos[:, :5], cache), dec(ids[:, 5:6], pos[:, 5:6], cache)], dim=1)


@pytest.mark.parametrize("scheme", list(NATIVE))
def test_fused_native_parts_share_views_and_match(native_on, scheme):
    model = _quantized(scheme)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, fused = FastDecoder(model, fuse=False), FastDecoder(model, fuse=True)
    layer = fused.layers[0]
    assert isinstance(layer.qkv, FusedQuantLinear) and layer.qkv.kernel.name == NATIVE[scheme]
    keys = sorted(layer.qkv._weight)
    assert {i: sorted(k) for i, k in layer.qkv.shared.items()} == {0: keys, 1: keys, 2: keys}  # held once
    q = model.model.layers[0].self_attn.q_proj
    assert all(q._weight[k].untyped_storage().data_ptr() == layer.qkv._weight[k].untyped_storage().data_ptr()
               for k in keys)  # fmt: skip
    ids = torch.tensor([PROMPTS[2][:6]])
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), atol=0, rtol=0)  # row by row the same sums
    cfg = GenerationConfig(max_new_tokens=12)
    assert generate(fused, PROMPTS[:2], cfg) == generate(plain, PROMPTS[:2], cfg)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("scheme", ["int4-channel", "int8-g32-sym"])
def test_checkpoint_bytes_do_not_depend_on_the_kernel(native_on, monkeypatch, tmp_path, scheme):
    model = _quantized(scheme)
    q = model.model.layers[0].self_attn.q_proj
    assert q.kernel.name == NATIVE[scheme]
    ours = model.state_dict()
    monkeypatch.setenv(build.ENV, "0")
    build.reset()
    torch_kernels = _quantized(scheme)
    assert torch_kernels.model.layers[0].self_attn.q_proj.kernel.name != NATIVE[scheme]
    theirs = torch_kernels.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    monkeypatch.setenv(build.ENV, "1")
    build.reset()
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _ = load_compressed(out)
    assert loaded.model.layers[0].self_attn.q_proj.kernel.name == NATIVE[scheme]
    again = loaded.state_dict()
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    ids = torch.tensor([PROMPTS[0] + [7]])
    torch.testing.assert_close(_logits(FastDecoder(loaded), ids), _logits(FastDecoder(model), ids), atol=0, rtol=0)


def test_compiled_graph_keeps_the_native_op_without_breaks(native_on):
    model = _quantized("int8-g32-sym")
    fused = FastDecoder(model).layers[0].qkv
    x = torch.randn(1, fused.in_features)
    eager = fused(x)
    explained = torch._dynamo.explain(fused.__call__)(x)
    assert explained.graph_break_count == 0
    assert "slimlm.native_q8_mm" in str(explained.graphs[0].graph)
    compiled = torch.compile(fused.__call__, fullgraph=True, backend="aot_eager")  # the fake kernel gives shapes
    torch.testing.assert_close(compiled(x), eager, atol=0, rtol=0)


def test_compiled_step_gives_the_eager_tokens(native_on):
    dec = make_decoder(_quantized("int8-g32-sym"))
    cfg = GenerationConfig(max_new_tokens=8)
    eager = generate(dec, PROMPTS[:1], cfg)
    assert generate(dec, PROMPTS[:1], cfg, step=compile_step(dec)) == eager
