"""Native decode attention (slimlm.kernels.native.attention) against torch's attention: every shape it takes
(grouped-query, register and plain units, split keys merged across threads, strided cache views), what it
refuses, the opaque op, and the fast decoder's steps through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.kernels.native import attention as native_attention

TOL = 2e-5


def _reference(q, k, v, scale):
    B, Hq, T, D = q.shape
    g = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # query head i reads KV head i // g
    return F.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), scale=scale).float()


def _cache(B, Hkv, S, D, gen, room=7, dtype=torch.float32):
    """K/V as a static cache holds them: a [:, :, :S] view of longer rows (stored in ``dtype``)."""
    k = torch.randn(B, Hkv, S + room, D, generator=gen) * 2
    v = torch.randn(B, Hkv, S + room, D, generator=gen)
    return k.to(dtype)[:, :, :S], v.to(dtype)[:, :, :S]


@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("B,Hkv,g", [(1, 3, 3), (2, 1, 4), (1, 2, 1), (2, 2, 5)])
def test_equals_attention_over_every_key(isa, threads, D, B, Hkv, g, kv):
    """K/V in half precision: the reference reads the same stored values, so the tolerance stays float32's."""
    gen = torch.Generator().manual_seed(D * 7 + g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for S in (1, 2, 63, 128, 129, 600):  # one chunk, and keys split over threads (>= 128)
            k, v = _cache(B, Hkv, S, D, gen, dtype=kv)
            q = torch.randn(B, Hkv * g, 1, D, generator=gen)
            got = native_attention.decode_attention(q, k, v, 0.125)
            torch.testing.assert_close(got, _reference(q, k, v, 0.125), rtol=TOL, atol=TOL, msg=f"S={S} isa={isa}")
    finally:
        torch.set_num_threads(old)


def test_one_dominant_key_in_the_second_half_is_found(native_on):
    """A score far above the rest in the other thread's chunk: the merge must weight the chunks by their maxima."""
    gen = torch.Generator().manual_seed(0)
    k, v = _cache(1, 3, 600, 64, gen)
    q = torch.randn(1, 9, 1, 64, generator=gen)
    k[:, :, 450] = q.view(1, 3, 3, 64)[:, :, 0] * 4  # each KV head's first query head matches key 450
    torch.testing.assert_close(native_attention.decode_attention(q, k, v, 0.125), _reference(q, k, v, 0.125),
                               rtol=TOL, atol=TOL)  # fmt: skip


def test_what_it_does_not_take():
    q, k, v = torch.randn(1, 6, 1, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    assert native_attention.fits(q, k, v)
    assert not native_attention.fits(torch.randn(1, 6, 2, 64), k, v)  # prefill: torch's attention
    assert not native_attention.fits(q.double(), k.double(), v.double())
    assert native_attention.fits(q, k.half(), v.half()) and native_attention.fits(q, k.bfloat16(), v.bfloat16())
    assert not native_attention.fits(q.half(), k.half(), v.half())  # queries stay float32
    assert not native_attention.fits(q, k.half(), v.bfloat16())  # one type for keys and values
    assert not native_attention.fits(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)  # rows not contiguous
    assert not native_attention.fits(torch.randn(1, 34, 1, 64), k, v)  # 17 query heads per KV head


def test_the_opaque_op_matches_and_has_a_fake(native_on):
    gen = torch.Generator().manual_seed(3)
    k, v = _cache(1, 3, 40, 64, gen)
    q = torch.randn(1, 9, 1, 64, generator=gen)
    torch.library.opcheck(native_attention.attn_decode_op, (q, k, v, 0.125))
    torch.testing.assert_close(torch.ops.slimlm.native_attn_decode(q, k, v, 0.125), _reference(q, k, v, 0.125),
                               rtol=TOL, atol=TOL)  # fmt: skip


@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_decoder_steps_through_it_with_the_same_logits(native_on, kv, monkeypatch):
    """kv_dtype half: the kernel reads the stored half values as torch's attention path does (widened, float32
    math). One sequence: a batch of two carries a padding mask, which the kernel leaves to torch."""
    from slimlm.generation.decoder import FastDecoder
    from slimlm.models.tiny import tiny_model

    calls = []
    kernel = native_attention.decode_attention
    monkeypatch.setattr(native_attention, "decode_attention", lambda *a: calls.append(a[1].dtype) or kernel(*a))
    model = tiny_model("llama")  # grouped-query heads
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    steps = {}
    for native in (False, True):
        dec = FastDecoder(model, native_attention=native, kv_dtype=kv)
        cache = dec.new_cache(1, 32)
        logits = [dec(ids, torch.arange(9)[None], cache, n_logits=1)]
        for t in range(9, 20):
            logits.append(dec(logits[-1][:, -1].argmax(-1, keepdim=True), torch.full((1, 1), t), cache))
        steps[native] = torch.cat(logits, dim=1)
        assert cache.k[0].dtype == kv
    assert len(calls) == 11 * len(dec.layers) and set(calls) == {kv}  # every one-token step of the native run
    assert FastDecoder(model).native_attention  # chosen by default where the library loads
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-5, atol=1e-5)
