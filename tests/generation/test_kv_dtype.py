"""A KV cache kept in half precision (``kv_dtype``): stored at half the bytes and read back rounded, the
compiled step runs over it, and bad values get one clear error. The native kernel over it:
tests/kernels/test_native_attention.py."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.generation import GenerationConfig, compile_step, generate, make_decoder
from slimlm.generation.decoder import FastDecoder
from slimlm.generation.kv import H2O, KIVI, KVCompressedDecoder, PagedKVCache, Sinks
from tests.generation.conftest import varied_tiny

PROMPT = [5, 17, 99, 230, 41, 7, 300, 12, 64]


def _steps(dec, ids, n=12):
    """Logits of a prefill and n greedy one-token steps, (B, 1 + n, V)."""
    B, T = ids.shape
    cache = dec.new_cache(B, T + n)
    logits = [dec(ids, torch.arange(T).expand(B, T), cache, n_logits=1)]
    for t in range(T, T + n):
        logits.append(dec(logits[-1][:, -1].argmax(-1, keepdim=True), torch.full((B, 1), t), cache))
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_half_cache_holds_half_the_bytes_and_reads_back_rounded(kv):
    model = varied_tiny("llama")  # grouped-query heads
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    full, full_cache = _steps(FastDecoder(model, native_attention=False), ids)
    half, cache = _steps(FastDecoder(model, kv_dtype=kv, native_attention=False), ids)
    assert cache.k[0].dtype == cache.v[0].dtype == getattr(torch, kv)
    assert cache.nbytes() * 2 == full_cache.nbytes()
    # close to the float32 cache, not equal to it: the stored values are rounded
    assert 0 < (half - full).abs().max() < (0.05 if kv == "bfloat16" else 0.01)


def test_compiled_step_over_a_half_cache_gives_its_eager_tokens():
    dec = make_decoder(varied_tiny("llama"), kv_dtype=torch.float16)
    cfg = GenerationConfig(max_new_tokens=10)
    assert generate(dec, [PROMPT], cfg, step=compile_step(dec)) == generate(dec, [PROMPT], cfg)


def test_bad_kv_dtype_gets_one_clear_error():
    model = varied_tiny("llama")
    with pytest.raises(SlimlmError, match="kv_dtype 'int8' is not one of float32, float16, bfloat16"):
        make_decoder(model, kv_dtype="int8")
    with pytest.raises(SlimlmError, match="kv_dtype needs slimlm's fast decoder"):
        make_decoder(model, fast=False, kv_dtype="float16")


def _paged(dec):
    return lambda batch, max_len: PagedKVCache(dec.cache_spec(), batch=batch, max_len=max_len, block_size=4)


@pytest.mark.parametrize("kind", [None, KIVI(4), Sinks(16), H2O(16)], ids=["paged", "kivi", "sinks", "h2o"])
def test_every_cache_kind_keeps_the_half_dtype(kind):
    """The decoder hands each cache keys and values already in kv_dtype (index writes do not cast)."""
    model, cfg, prompt = varied_tiny("llama"), GenerationConfig(max_new_tokens=12), [PROMPT * 3]
    held = {}
    for kv in (None, torch.float16):
        dec = make_decoder(model, kv_dtype=kv)
        if kind is None:
            caches = []
            make = _paged(dec)
            out = generate(dec, prompt, cfg, cache_fn=lambda b, n: caches.append(make(b, n)) or caches[-1])
            cache = caches[-1]
        else:
            dec = KVCompressedDecoder(dec, kind)
            out = generate(dec, prompt, cfg)
            cache = dec.last_cache
        assert len(out[0]) == 12
        held[kv] = cache.nbytes()
    assert held[torch.float16] < held[None]
