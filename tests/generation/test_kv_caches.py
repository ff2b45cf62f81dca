import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.cli import kv_decoder
from slimlm.generation.kv.protocol import CacheSpec, KVView, attention_mask
from slimlm.generation.kv.static import StaticKVCache
from slimlm.generation.decoder import make_decoder
from slimlm.generation.kv.compressed import KVCompressedDecoder, make_kv_cache
from slimlm.generation.kv.evicting import H2OCache, SinkCache
from slimlm.generation.kv.kivi import KIVICache
from slimlm.generation.kv.policies import H2O, Sinks, Window
from slimlm.generation.kv.quant import KIVI
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.generation.rope import Rope
from slimlm.models.tiny import tiny_model
from tests.generation.conftest import varied_tiny

N = 48
IDS = torch.randint(4, 500, (1, N), generator=torch.Generator().manual_seed(0))
POS = torch.arange(N)[None]


@pytest.fixture(scope="module")
def dec():
    return make_decoder(tiny_model("llama"))


def _run(dec, cache, chunks, ids=IDS):
    outs, s = [], 0
    for c in chunks:
        outs.append(dec(ids[:, s:s + c], POS[:, s:s + c], cache))
        s += c
    assert s == ids.shape[1]
    return torch.cat(outs, dim=1)  # (1, N, V)


def _full(dec, ids=IDS):
    return dec(ids, POS[:, :ids.shape[1]], StaticKVCache(dec.cache_spec(), batch=1, max_len=ids.shape[1]))


class NaiveSinkCache:
    """Reference for SinkCache: raw keys kept in stream order, evicted by list surgery, rotated at 0..n-1."""

    raw_keys = True

    def __init__(self, n_layers, budget, sinks):
        self.budget, self.sinks = budget, sinks
        self.k, self.v = [None] * n_layers, [None] * n_layers

    def update(self, layer, k, v, *, positions, rope):
        T = k.shape[2]
        for store, new in ((self.k, k), (self.v, v)):
            old = store[layer]
            if old is not None and old.shape[2] + T > self.budget:  # drop the oldest non-sink tokens
                drop = old.shape[2] + T - self.budget
                old = torch.cat([old[:, :, :self.sinks], old[:, :, self.sinks + drop:]], dim=2)
            store[layer] = new if old is None else torch.cat([old, new], dim=2)
        n = self.k[layer].shape[2]
        key_pos, q_pos = torch.arange(n)[None], torch.arange(n - T, n)[None]
        return KVView(rope(self.k[layer], key_pos), self.v[layer], attention_mask(key_pos, q_pos), q_pos)

    def wants_scores(self, layer):
        return False

    def observe(self, layer, probs):
        pass


@pytest.mark.parametrize("kind", [Sinks(64, 4), Window(64), H2O(64), KIVI(4, group=16, residual=64)])
def test_a_budget_larger_than_the_text_equals_the_full_cache(dec, kind):
    cache = make_kv_cache(dec.cache_spec(), kind)
    assert torch.allclose(_run(dec, cache, [10, *[1] * 38]), _full(dec), atol=1e-5)


@pytest.mark.parametrize("sinks", [4, 0])
@pytest.mark.parametrize("chunks", [[1] * N, [12, *[1] * 36], [8, 1, 3, 1, 5, 1, 1, 4, *[1] * 24]])
def test_sinks_and_window_match_a_naive_reference(dec, sinks, chunks):
    policy = Sinks(12, sinks) if sinks else Window(12)
    out = _run(dec, SinkCache(dec.cache_spec(), batch=1, policy=policy), chunks)
    ref = _run(dec, NaiveSinkCache(dec.cache_spec().n_layers, 12, sinks), chunks)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, _full(dec), atol=1e-3)  # eviction did change something


def test_sinks_hold_exactly_the_first_tokens_and_the_recent_window(dec):
    cache = SinkCache(dec.cache_spec(), batch=1, policy=Sinks(12, 4))
    _run(dec, cache, [1] * N)
    full = StaticKVCache(dec.cache_spec(), batch=1, max_len=N)
    dec(IDS, POS, full)
    # Layer-0 values depend on the token alone, so they identify which tokens the cache holds.
    want = [0, 1, 2, 3, *range(N - 8, N)]
    held = cache.v[0][:, :, cache.order]  # (1, Hkv, 12, D) in in-cache position order
    assert torch.allclose(held, full.v[0][:, :, want], atol=1e-6)
    assert cache.length == 12 and cache.seen == N


def _unit_rope(P=64, D=4):
    return Rope(torch.ones(P, D), torch.zeros(P, D))  # identity rotation


def test_h2o_evicts_the_lowest_accumulated_score_and_protects_the_recent_window():
    spec = CacheSpec(kv_heads=(1,), head_dim=4)
    cache = H2OCache(spec, batch=1, policy=H2O(4, recent=2))
    weight = {1: 8.0, 3: 30.0}  # each query attends in proportion to these (1 for other tokens)
    held_ref, score_ref = [], {}  # a plain-Python H2O: accumulated scores, evict the lowest old one
    for t in range(7):
        if len(held_ref) + 1 > 4:
            old = sorted(held_ref[:-1], key=lambda j: (-score_ref[j], j))[:2]  # the newest held one is recent
            held_ref = sorted(old) + held_ref[-1:]
        held_ref.append(t)
        v = torch.full((1, 1, 1, 4), float(t))  # a value that names the token
        view = cache.update(0, v, v, positions=torch.tensor([[t]]), rope=_unit_rope())
        held = view.v[0, 0, :, 0].long().tolist()
        assert held == held_ref
        w = torch.tensor([weight.get(j, 1.0) for j in held])
        cache.observe(0, (w / w.sum()).view(1, 1, 1, -1))
        for j, p in zip(held, (w / w.sum()).tolist()):
            score_ref[j] = score_ref.get(j, 0.0) + p
    # the heavy hitters 1 and 3 outlast token 0 (which led early) once 3 has gathered more; 5, 6 are recent
    assert held == [1, 3, 5, 6]


def test_h2o_scores_accumulate_every_query_head(dec):
    spec = dec.cache_spec()
    cache = H2OCache(spec, batch=1, policy=H2O(64))
    _run(dec, cache, [20, *[1] * 10], ids=IDS[:, :30])
    g = 4 // spec.kv_heads[0]  # query heads per KV head in the tiny llama
    for s in cache.scores:  # each query's probabilities sum to one; nothing evicted yet
        assert torch.allclose(s.sum(-1), torch.full_like(s.sum(-1), g * 30.0), atol=1e-4)


def test_h2o_prefill_equals_stepping_and_differs_from_the_window(dec):
    spec = dec.cache_spec()
    a = _run(dec, H2OCache(spec, batch=1, policy=H2O(16)), [16, *[1] * 32])
    b = _run(dec, H2OCache(spec, batch=1, policy=H2O(16)), [1] * N)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, _run(dec, SinkCache(spec, batch=1, policy=Window(16)), [1] * N), atol=1e-3)


@pytest.mark.parametrize("bits, budget", [(8, 0.002), (4, 0.03), (2, 0.15)])
def test_kivi_chunks_equal_steps_and_logit_error_within_budget(dec, bits, budget):
    q = KIVI(bits, group=4, residual=8)
    step = _run(dec, KIVICache(dec.cache_spec(), batch=1, quant=q), [1] * N)
    chunked = _run(dec, KIVICache(dec.cache_spec(), batch=1, quant=q), [7, 13, 9, 1, 18])
    assert torch.allclose(step, chunked, atol=1e-5)
    ref = _full(dec)
    assert ((step - ref).norm() / ref.norm()).item() <= budget
    assert torch.allclose(step[:, :8], ref[:, :8], atol=1e-5)  # the first R tokens see only float K/V
    assert not torch.allclose(step[:, 8:], ref[:, 8:], atol=1e-5)


def test_cache_memory_is_what_the_tensors_hold(dec):
    spec = dec.cache_spec()
    L, H, D = spec.n_layers, spec.kv_heads[0], spec.head_dim
    sinks = make_kv_cache(spec, Sinks(16, 4))
    assert sinks.nbytes() == 2 * L * H * 16 * D * 4
    assert make_kv_cache(spec, H2O(16)).nbytes() == sinks.nbytes() + L * H * 16 * 4
    kivi = KIVICache(spec, batch=1, quant=KIVI(4, group=4, residual=8))
    _run(dec, kivi, [1] * N)
    nk, nv = 40, 39  # keys quantized in blocks of 8 below 8 * floor(47 / 8); values below 47 - 8
    per_layer = (nk * H * D // 2 + nk // 4 * H * D * 2 * 2  # key codes + float16 scale, min per channel per group
                 + nv * H * (D // 2 + 2 * 2)  # value codes + float16 scale, min per token
                 + ((N - nk) + (N - nv)) * H * D * 4)  # float residuals
    assert (kivi.nk, kivi.nv) == (nk, nv) and kivi.nbytes() == L * per_layer
    assert kivi.nbytes() < 0.45 * StaticKVCache(spec, batch=1, max_len=N).nbytes()


def test_crop(dec):
    spec = dec.cache_spec()
    a = SinkCache(spec, batch=1, policy=Sinks(12, 4))
    _run(dec, a, [1] * 20, ids=IDS[:, :20])  # holds 0-3 and 12-19, in a ring
    a.crop(10)  # keep the 10 oldest held: 0-3 and 12-17
    b = NaiveSinkCache(spec.n_layers, 12, 4)
    _run(dec, b, [1] * 20, ids=IDS[:, :20])
    for layer in range(spec.n_layers):
        b.k[layer], b.v[layer] = b.k[layer][:, :, :10], b.v[layer][:, :, :10]
    nxt = IDS[:, 20:21], torch.tensor([[20]])
    assert torch.allclose(dec(*nxt, a), dec(*nxt, b), atol=1e-5)
    k = KIVICache(spec, batch=1, quant=KIVI(4, group=4, residual=8))
    _run(dec, k, [1] * 20, ids=IDS[:, :20])
    with pytest.raises(SlimlmError, match="cannot be un-quantized"):
        k.crop(18)


@pytest.mark.parametrize("make, call, needle", [
    (lambda s: SinkCache(s, batch=1, policy=Sinks(8, 2)), lambda d, c: _run(d, c, [8, 7], ids=IDS[:, :15]),
     "at most 6 at a time"),
    (lambda s: SinkCache(s, batch=1, policy=Window(8)), lambda d, c: d(IDS[:, :9], POS[:, :9], c),
     "exceeds the KV budget 8"),
    (lambda s: H2OCache(s, batch=1, policy=H2O(8, 2)), lambda d, c: _run(d, c, [8, 3], ids=IDS[:, :11]),
     "at most 2 at a time"),
    (lambda s: SinkCache(s, batch=1, policy=Sinks(512)), lambda d, c: d(IDS[:, :2], POS[:, :2], c),
     "exceeds the model's 256 rotary positions"),
    (lambda s: SinkCache(s, batch=2, policy=Sinks(8)),
     lambda d, c: d(IDS[:, :3].expand(2, 3), torch.tensor([[-1, 0, 1], [0, 1, 2]]), c), "unpadded rows only"),
    (lambda s: make_kv_cache(s, "sinks"), None, "use Window, Sinks, H2O or KIVI"),
])
def test_refusals_are_one_line(dec, make, call, needle):
    with pytest.raises(SlimlmError) as e:
        cache = make(dec.cache_spec())
        call(dec, cache)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_compressed_decoder_generates_like_the_static_cache_within_budget_and_streams_past_it():
    dec = make_decoder(varied_tiny("llama"))
    prompt = IDS[0, :20].tolist()
    cfg = GenerationConfig(max_new_tokens=12)
    plain = generate(dec, [prompt], cfg)
    for kind in (Sinks(64), H2O(64), KIVI(8, group=4, residual=8)):
        assert generate(KVCompressedDecoder(dec, kind), [prompt], cfg) == plain
    # a prompt longer than the budget: filled to the budget, then in pieces; chunk=1 is exact streaming
    wrapped = KVCompressedDecoder(dec, Sinks(12, 4), chunk=1)
    cache = wrapped.new_cache(1, N)
    last = wrapped(IDS, POS, cache, n_logits=3)
    stepped = _run(dec, SinkCache(dec.cache_spec(), batch=1, policy=Sinks(12, 4)), [1] * N)
    assert last.shape[1] == 3 and torch.allclose(last, stepped[:, -3:], atol=1e-5)
    out = generate(KVCompressedDecoder(dec, Sinks(12, 4)), [IDS[0].tolist()], cfg)  # default chunk 12 // 8 = 1
    assert len(out[0]) == 12
    assert kv_decoder(dec, policy=None, budget=None) is None
    assert kv_decoder(dec, policy="h2o", budget=32).kind == H2O(32)
    assert kv_decoder(dec, policy=None, budget=None, bits=4).kind == KIVI(4)
    with pytest.raises(SlimlmError, match="do not combine"):
        kv_decoder(dec, policy="sinks", budget=32, bits=4)
    with pytest.raises(SlimlmError, match="--kv-budget needs --kv-policy"):
        kv_decoder(dec, policy=None, budget=32)
