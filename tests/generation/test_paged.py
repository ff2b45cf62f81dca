import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.generation.decoder import make_decoder
from slimlm.generation.loop import GenerationConfig, generate, left_pad
from slimlm.generation.kv.paged import PagedKVCache
from tests.generation.conftest import varied_tiny

PROMPTS = [[5, 17, 99, 230, 41], [8, 300, 77], [12, 450, 64, 3, 200, 201, 202, 9, 10, 11], [9]]


def _run(dec, cache, steps=6):
    """Prefill a left-padded batch, then feed fixed tokens; logits of every forward."""
    ids, pos = left_pad(PROMPTS, "cpu")
    outs = [dec(ids, pos, cache)[:, -1]]
    nxt = pos[:, -1:] + 1
    for i in range(steps):
        tok = torch.full((len(PROMPTS), 1), 100 + i)
        outs.append(dec(tok, nxt, cache)[:, -1])
        nxt = nxt + 1
    return torch.stack(outs, dim=1)  # (B, steps+1, V)


@pytest.mark.parametrize("family,block", [("llama", 4), ("qwen3", 3), ("mistral", 16)])
def test_paged_gives_the_contiguous_logits(family, block):
    dec = make_decoder(varied_tiny(family))
    static = _run(dec, dec.new_cache(4, 24))
    paged_cache = PagedKVCache(dec.cache_spec(), batch=4, max_len=24, block_size=block)
    paged = _run(dec, paged_cache)
    torch.testing.assert_close(paged, static, atol=1e-5, rtol=1e-5)
    assert paged_cache.lens == [len(p) + 6 for p in PROMPTS]  # padding takes no space
    need = sum(-(-(len(p) + 6) // block) for p in PROMPTS)
    assert paged_cache.used_blocks == need == paged_cache.peak_blocks
    assert paged_cache.peak_tokens == sum(paged_cache.lens)
    assert paged_cache.nbytes() == need * block * dec.cache_spec().bytes_per_token()


def test_paged_generation_equals_static_and_frees_finished_rows():
    dec = make_decoder(varied_tiny("llama"))
    cfg = GenerationConfig(max_new_tokens=12)
    ref = generate(dec, PROMPTS, cfg, batch_size=4)
    caches = []

    def paged(batch, max_len):
        caches.append(PagedKVCache(dec.cache_spec(), batch=batch, max_len=max_len, block_size=4))
        return caches[-1]

    assert generate(dec, PROMPTS, cfg, batch_size=4, cache_fn=paged) == ref
    stop = next(t for i, t in enumerate(ref[1]) if i >= 2 and t not in ref[1][:i])
    out = generate(dec, PROMPTS, GenerationConfig(12, stop_tokens=(stop,)), batch_size=4, cache_fn=paged)
    for row, full in zip(out, ref):
        assert row == (full[: full.index(stop) + 1] if stop in full else full)
    order = sorted(range(4), key=lambda i: len(PROMPTS[i]))  # the batch is in length order
    for b, i in enumerate(order):  # rows that stopped gave their blocks back
        assert (caches[-1].lens[b] == 0) == (stop in ref[i])


def test_crop_release_and_block_reuse():
    dec = make_decoder(varied_tiny("llama"))
    cache = PagedKVCache(dec.cache_spec(), batch=1, max_len=16, block_size=4, n_blocks=4)  # 3 usable blocks
    ids = torch.arange(20, 30)[None]
    dec(ids, torch.arange(10)[None], cache)
    assert cache.used_blocks == 3 and cache.length == 10
    cache.crop(5)
    assert cache.used_blocks == 2 and cache.length == 5
    after = dec(ids[:, 5:8], torch.arange(5, 8)[None], cache)
    fresh = dec(ids[:, :8], torch.arange(8)[None], dec.new_cache(1, 16))
    torch.testing.assert_close(after, fresh[:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimlmError, match="out of blocks"):
        dec(torch.arange(5)[None] + 40, torch.arange(8, 13)[None], cache)
