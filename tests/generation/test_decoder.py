import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme
from slimlm.generation.kv.protocol import KVView, attention_mask
from slimlm.generation.kv.static import StaticKVCache
from slimlm.generation.decoder import FAST_FAMILIES, FastDecoder, HFDecoder, make_decoder
from slimlm.models.tiny import tiny_model
from slimlm.quant import RTN

IDS = torch.tensor([[5, 17, 99, 230, 41, 8, 300, 77, 12, 450, 64, 3]])  # (1, 12)
POS = torch.arange(IDS.shape[1])[None]


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _chunked(dec, cuts=(7, 8), ids=IDS):
    """Logits of a prefill and the following chunks through one cache."""
    cache = dec.new_cache(ids.shape[0], 32)
    bounds = (0, *cuts, ids.shape[1])
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    outs = [dec(ids[:, a:b], pos[:, a:b], cache) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("family", [*FAST_FAMILIES, "gpt2", "opt", "phi3", "gemma2"])
def test_prefill_then_steps_match_the_hf_forward(family):
    model = tiny_model(family)
    dec = make_decoder(model)
    assert isinstance(dec, FastDecoder) == (family in FAST_FAMILIES)
    out, cache = _chunked(dec)
    torch.testing.assert_close(out, _hf_logits(model), atol=2e-5, rtol=1e-4)
    assert cache.length == IDS.shape[1]


def test_unfused_and_fused_agree_and_last_logits_only():
    model = tiny_model("qwen3")
    fused, plain = FastDecoder(model, fuse=True), FastDecoder(model, fuse=False)
    a = fused(IDS, POS, fused.new_cache(1, 16))
    b = plain(IDS, POS, plain.new_cache(1, 16), n_logits=3)
    torch.testing.assert_close(a[:, -3:], b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["int8-channel-sym", "int4-g16"])
def test_quantized_model_runs_its_quant_linears(scheme):
    model = tiny_model("llama")
    apply(model, RTN(scheme=parse_scheme(scheme)))
    dec = make_decoder(model)
    out, _ = _chunked(dec)
    torch.testing.assert_close(out, _hf_logits(model), atol=1e-4, rtol=1e-3)


def _prune(model):
    """Structural pruning by hand: drop KV head 1 (and its 2 query heads) in layer 0, half the
    MLP neurons in layer 1, then the last layer after adding a third."""
    attn = model.model.layers[0].self_attn
    D = attn.head_dim
    keep_q, keep_kv = torch.arange(0, 2 * D), torch.arange(0, D)
    for name, rows in (("q_proj", keep_q), ("k_proj", keep_kv), ("v_proj", keep_kv)):
        lin = getattr(attn, name)
        new = torch.nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
        new.weight.data = lin.weight.data[rows].clone()
        setattr(attn, name, new)
    o = attn.o_proj
    new_o = torch.nn.Linear(len(keep_q), o.out_features, bias=False)
    new_o.weight.data = o.weight.data[:, keep_q].clone()
    attn.o_proj = new_o
    mlp = model.model.layers[1].mlp
    keep = torch.arange(0, mlp.gate_proj.out_features, 2)
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        new = torch.nn.Linear(lin.in_features, len(keep), bias=False)
        new.weight.data = lin.weight.data[keep].clone()
        setattr(mlp, name, new)
    new_down = torch.nn.Linear(len(keep), mlp.down_proj.out_features, bias=False)
    new_down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
    mlp.down_proj = new_down
    return model


def test_structurally_pruned_model_matches_hf():
    model = _prune(tiny_model("llama"))
    dec = make_decoder(model)
    assert dec.cache_spec().kv_heads == (1, 2)
    out, _ = _chunked(dec)
    torch.testing.assert_close(out, _hf_logits(model), atol=2e-5, rtol=1e-4)
    del model.model.layers[1]
    model.config.num_hidden_layers = 1
    out, _ = _chunked(make_decoder(model))
    torch.testing.assert_close(out, _hf_logits(model), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_crop_rolls_back_like_a_fresh_run(family):
    dec = make_decoder(tiny_model(family))
    cache = dec.new_cache(1, 32)
    draft = torch.tensor([[400, 401, 402, 403]])
    dec(IDS[:, :8], POS[:, :8], cache)
    verify = dec(draft, torch.arange(8, 12)[None], cache)  # speculative check: logits for all 4
    assert verify.shape[1] == 4
    cache.crop(9)  # keep the first draft token, reject the rest
    after = dec(IDS[:, 9:12], POS[:, 9:12], cache)
    ids = torch.cat([IDS[:, :8], draft[:, :1], IDS[:, 9:12]], dim=1)
    fresh = dec(ids, torch.arange(12)[None], dec.new_cache(1, 32))
    torch.testing.assert_close(after, fresh[:, 9:], atol=2e-5, rtol=1e-4)
    with pytest.raises(SlimlmError, match="cannot crop"):
        cache.crop(40)


class _ScoreCache(StaticKVCache):
    """Asks for the attention probabilities of every layer."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def wants_scores(self, layer):
        return True

    def observe(self, layer, probs):
        self.seen.append((layer, probs))


class _RawKeyCache(StaticKVCache):
    """Stores keys before rotary and rotates them at read time, with positions shifted by 5
    (relative positions are all attention sees, so the logits must not change)."""

    raw_keys = True

    def update(self, layer, k, v, *, positions, rope):
        view = super().update(layer, k, v, positions=positions, rope=rope)
        key_pos = self.slot_pos[:, : self.length] + 5  # (B, S)
        return KVView(rope(view.k, key_pos), view.v, view.mask, positions + 5)


@pytest.mark.parametrize("cache_cls", [_ScoreCache, _RawKeyCache])
def test_protocol_hooks_keep_the_logits(cache_cls):
    model = tiny_model("qwen3")
    dec = make_decoder(model)
    cache = cache_cls(dec.cache_spec(), batch=1, max_len=32)
    dec.ensure_positions(64)
    out = torch.cat([dec(IDS[:, :7], POS[:, :7], cache), dec(IDS[:, 7:8], POS[:, 7:8], cache)], dim=1)
    torch.testing.assert_close(out, _hf_logits(model, IDS[:, :8]), atol=2e-5, rtol=1e-4)
    if cache_cls is _ScoreCache:
        assert [layer for layer, _ in cache.seen] == [0, 1, 0, 1]
        probs = cache.seen[0][1]  # (B, Hq, T, S) of the prefill
        assert probs.shape == (1, 4, 7, 7)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 7))
        assert probs[0, :, 0, 1:].abs().max() == 0  # causal: the first token sees only itself


def test_attention_mask_positions_padding_and_window():
    key = torch.tensor([[-1, 0, 1, 2]])
    q = torch.tensor([[-1, 2]])
    m = attention_mask(key, q)[0, 0]
    assert m.tolist() == [[True] * 4, [False, True, True, True]]
    assert attention_mask(key, q, window=2)[0, 0, 1].tolist() == [False, False, True, True]


def test_cache_refuses_overflow_and_wrong_batch():
    dec = make_decoder(tiny_model("llama"))
    cache = dec.new_cache(1, 4)
    with pytest.raises(SlimlmError, match="KV cache full"):
        dec(IDS[:, :5], POS[:, :5], cache)
    with pytest.raises(SlimlmError, match="batch"):
        dec(IDS[:, :2].expand(2, 2), POS[:, :2].expand(2, 2), dec.new_cache(1, 8))
    with pytest.raises(SlimlmError, match="fast decoder cannot"):
        make_decoder(tiny_model("gpt2"), fast=True)
    assert isinstance(make_decoder(tiny_model("llama"), fast=False), HFDecoder)


def test_static_cache_bytes_match_the_spec():
    dec = make_decoder(tiny_model("mistral"))
    spec = dec.cache_spec()
    cache = dec.new_cache(2, 10)
    assert cache.nbytes() == 2 * 10 * spec.bytes_per_token() == 2 * 10 * 2 * 2 * 2 * 16 * 4


def test_mistral_sliding_window_matches_hf():
    from transformers import AutoModelForCausalLM

    from slimlm.models.tiny import tiny_config

    cfg = tiny_config("mistral")
    cfg.sliding_window = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    dec = make_decoder(model)
    assert dec.cache_spec().sliding_window == 4
    out, _ = _chunked(dec, cuts=(7, 8, 9, 10))  # single-token steps past the window use the mask
    torch.testing.assert_close(out, _hf_logits(model), atol=2e-5, rtol=1e-4)


def test_attention_takes_sdpa_output_in_any_memory_layout(monkeypatch):
    """CUDA's memory-efficient SDPA returns (B, H, T, D) values laid out as (B, T, H, D) (seen on an H200 with
    a masked float32 GQA prefill, where ``.view`` raised); the decoder must not depend on the layout."""
    import torch.nn.functional as F

    from slimlm.generation import decoder as dec_mod

    model = tiny_model("llama")  # GQA: 4 query heads over 2 KV heads
    ids = torch.randint(4, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    dec = make_decoder(model)
    want = dec(ids, torch.arange(9)[None], dec.new_cache(1, 16))
    sdpa = F.scaled_dot_product_attention

    def transposed_layout(*a, **k):
        out = sdpa(*a, **k)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, CUDA-like strides

    monkeypatch.setattr(dec_mod.F, "scaled_dot_product_attention", transposed_layout)
    torch.testing.assert_close(dec(ids, torch.arange(9)[None], dec.new_cache(1, 16)), want)
