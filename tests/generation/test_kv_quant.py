"""KIVI maths: exact packing, half-a-step rounding, attention error budgets, region bookkeeping.

Error budgets (relative L2 error of the attention output softmax(qK^T)V):
random tensors with offset outlier key channels: int8 <= 2%, int4 <= 25%, int2 <= 120%
(measured ~1%, ~15%, ~85%); keys and values of a tiny model: int8 <= 1%, int4 <= 10%, int2 <= 50%
(measured ~0.4%, ~5%, ~30%).
"""

import pytest
import torch

from slimlm.formats.packing import pack_bits
from slimlm.generation.kv.static import StaticKVCache
from slimlm.generation.decoder import make_decoder
from slimlm.generation.kv.quant import (dequantize_keys, dequantize_values, kivi_mask, kivi_regions, quantize_keys,
                                        quantize_values, unpack_codes)
from slimlm.models.tiny import tiny_model

RANDOM_BUDGET = {8: 0.02, 4: 0.25, 2: 1.2}
TINY_BUDGET = {8: 0.01, 4: 0.10, 2: 0.50}


def _attn(q, K, V):
    return torch.softmax(q @ K.transpose(-1, -2) / K.shape[-1] ** 0.5, dim=-1) @ V


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _kv(seed=0, T=256, D=64):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(1, 4, T, D, generator=g)
    K[..., :4] = K[..., :4] * 8 + 5  # outlier channels with an offset, as in real keys
    V = torch.randn(1, 4, T, D, generator=g)
    q = torch.randn(1, 4, 8, D, generator=g)
    return q, K, V


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_inverts_pack_exactly(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_bits(codes, bits), bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rounding_error_is_at_most_half_a_step(bits):
    _, K, V = _kv()
    qk, qv = quantize_keys(K, bits=bits, group=32), quantize_values(V, bits=bits)
    assert qk.codes.dtype == torch.uint8 and qk.codes.shape == (1, 4, 8, 32, 64 * bits // 8)
    assert qk.scale.dtype == torch.float16 and qk.scale.shape == (1, 4, 8, 1, 64)
    assert qv.scale.shape == (1, 4, 256, 1)
    # per channel over 32 tokens: step = scale; float16 min adds at most |mn| * 2^-11
    k_step = qk.scale.float().repeat_interleave(32, dim=-3).reshape(1, 4, 256, 64)
    k_tol = k_step / 2 * 1.001 + qk.mn.float().abs().repeat_interleave(32, dim=-3).reshape(1, 4, 256, 64) * 2**-10
    assert ((dequantize_keys(qk) - K).abs() <= k_tol).all()
    v_tol = qv.scale.float() / 2 * 1.001 + qv.mn.float().abs() * 2**-10
    assert ((dequantize_values(qv) - V).abs() <= v_tol).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_attention_error_within_budget_on_random_tensors(bits):
    q, K, V = _kv()
    Kh = dequantize_keys(quantize_keys(K, bits=bits, group=32))
    Vh = dequantize_values(quantize_values(V, bits=bits))
    ref = _attn(q, K, V)
    err = _rel(_attn(q, Kh, Vh), ref)
    assert err <= RANDOM_BUDGET[bits]
    # KIVI's point: keys per channel beat keys per token when channels carry outliers
    Kt = dequantize_values(quantize_values(K, bits=bits))
    assert err < 0.8 * _rel(_attn(q, Kt, Vh), ref)


def test_value_groups_split_the_head():
    _, _, V = _kv()
    q16 = quantize_values(V, bits=4, group=16)
    assert q16.scale.shape == (1, 4, 256, 4)
    assert _rel(dequantize_values(q16), V) < _rel(dequantize_values(quantize_values(V, bits=4)), V)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_error_within_budget_on_tiny_model_kv(family):
    dec = make_decoder(tiny_model(family))
    ids = torch.randint(4, 500, (1, 128), generator=torch.Generator().manual_seed(0))
    cache = StaticKVCache(dec.cache_spec(), batch=1, max_len=128)
    dec(ids, torch.arange(128)[None], cache)
    for bits in (8, 4, 2):
        for K, V in zip(cache.k, cache.v):  # (1, Hkv, 128, D) rotated keys, values
            q = K[:, :, -16:]  # keys of recent tokens as stand-in queries
            out = _attn(q, dequantize_keys(quantize_keys(K, bits=bits, group=32)),
                        dequantize_values(quantize_values(V, bits=bits)))
            assert _rel(out, _attn(q, K, V)) <= TINY_BUDGET[bits]


@pytest.mark.parametrize("a, b", [(0, 0), (5, 5), (40, 40), (0, 37), (13, 50), (40, 41), (64, 64)])
def test_each_query_sees_each_token_in_exactly_one_version(a, b):
    R = 8
    regions = kivi_regions(a, b, R)
    mask = kivi_mask(regions, torch.arange(a, b + 1), R)  # (T, S)
    tokens = torch.cat([torch.arange(lo, hi) for _, lo, hi in regions])
    for t, i in enumerate(range(a, b + 1)):
        seen = tokens[mask[t]]
        assert sorted(seen.tolist()) == list(range(i + 1))  # every earlier token once, causal
        for j in range(i + 1):  # the version is the one stepwise decoding would use
            want = "qq" if j < i - R else ("qf" if j < (i // R) * R else "ff")
            col = [k for k, lo, hi in regions for jj in range(lo, hi) if jj == j]
            vis = [k for k, m in zip(col, mask[t][tokens == j].tolist()) if m]
            assert vis == [want]
    if a == b:  # one query: disjoint ranges covering 0..a, no mask needed
        assert tokens.tolist() == list(range(a + 1)) and bool(mask.all())
