"""CUDA-graph decode steps: the fixed-shape cache agrees with the static one (CPU), replays equal eager (CUDA)."""

import logging

import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme
from slimlm.generation import generate, make_decoder
from slimlm.generation.graphs import GraphKVCache, GraphStep
from slimlm.generation.kv.protocol import CacheSpec
from slimlm.generation.loop import GenerationConfig, decode_steps
from slimlm.quant import RTN
from tests.generation.conftest import varied_tiny

PROMPT = [5, 17, 99, 230, 41]
ROWS = [[5, 17, 99, 230, 41, 7, 8], [11, 300], [64, 65, 66, 67]]  # left padding in a batch
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fixed_shape_cache_gives_the_static_caches_tokens_and_logits(family):
    dec = make_decoder(varied_tiny(family))
    cfg = GenerationConfig(max_new_tokens=12)
    for rows in ([PROMPT], ROWS):
        assert generate(dec, rows, cfg, cache_fn=lambda b, n: GraphKVCache(dec.cache_spec(), batch=b, max_len=n)) \
            == generate(dec, rows, cfg)
    static, fixed = dec.new_cache(1, 16), GraphKVCache(dec.cache_spec(), batch=1, max_len=16)
    ids, pos = torch.tensor([PROMPT]), torch.arange(5)[None]
    torch.testing.assert_close(dec(ids, pos, fixed), dec(ids, pos, static))
    for t in range(5, 9):  # one-token steps: the whole cache masked vs a growing view
        a = dec(torch.tensor([[t]]), torch.tensor([[t]]), fixed)
        torch.testing.assert_close(a, dec(torch.tensor([[t]]), torch.tensor([[t]]), static), rtol=1e-5, atol=1e-5)
        assert fixed.length == static.length == t + 1 and int(fixed.slot) == t + 1


def test_fixed_shape_cache_crops_refuses_overflow_and_sliding_windows():
    dec = make_decoder(varied_tiny("llama"))
    cache = GraphKVCache(dec.cache_spec(), batch=1, max_len=6)
    dec(torch.tensor([PROMPT]), torch.arange(5)[None], cache)
    dec(torch.tensor([[3]]), torch.tensor([[5]]), cache)
    with pytest.raises(SlimlmError, match="KV cache full"):
        dec(torch.tensor([[3]]), torch.tensor([[6]]), cache)
    cache.crop(4)
    assert cache.length == 4 and int(cache.slot) == 4 and (cache.slot_pos[0, 4:] == -1).all()
    spec = CacheSpec(kv_heads=(2,), head_dim=8, sliding_window=4)
    with pytest.raises(SlimlmError, match="no sliding window"):
        GraphKVCache(spec, batch=1, max_len=8)


def test_graph_step_runs_the_decoder_as_is_on_cpu():
    dec = make_decoder(varied_tiny("llama"))
    step, cfg = GraphStep(dec), GenerationConfig(max_new_tokens=8)
    assert generate(dec, [PROMPT], cfg, step=step, cache_fn=step.new_cache) == generate(dec, [PROMPT], cfg)
    assert step.failed is None and step._graph is None  # nothing recorded off the GPU


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; run by scripts/gpu-check.sh")
@pytest.mark.parametrize("quant", [None, "int4-g32", "int8-channel-sym"])
def test_cuda_graph_replays_give_the_eager_steps_logits(quant):
    model = varied_tiny("llama").to("cuda", torch.bfloat16 if quant == "int4-g32" else torch.float32)
    if quant:
        apply(model, RTN(scheme=parse_scheme(quant)))
    dec = make_decoder(model)
    step = GraphStep(dec)
    for rows in ([PROMPT], ROWS):
        eager, graphed = [], []
        for out, kw in ((eager, {}), (graphed, {"step": step})):
            cache = GraphKVCache(dec.cache_spec(), batch=len(rows), max_len=max(map(len, rows)) + 10)
            cfg = GenerationConfig(max_new_tokens=10)
            out += [t.clone() for t in decode_steps(dec, rows, cfg, cache_fn=lambda b, n, c=cache: c, **kw)]
        assert torch.equal(torch.stack(graphed), torch.stack(eager))
        assert step.failed is None and step._graph is not None and step._cache is cache
    # bit-identical logits: the replayed kernels are the eager ones
    cache_a = GraphKVCache(dec.cache_spec(), batch=1, max_len=16)
    cache_b = GraphKVCache(dec.cache_spec(), batch=1, max_len=16)
    ids, pos = torch.tensor([PROMPT], device="cuda"), torch.arange(5, device="cuda")[None]
    dec(ids, pos, cache_a), dec(ids, pos, cache_b)
    for t in range(5, 10):
        x, p = torch.tensor([[t]], device="cuda"), torch.tensor([[t]], device="cuda")
        assert torch.equal(step(x, p, cache_a).clone(), dec(x, p, cache_b))
    assert cache_a.length == cache_b.length == 10 and int(cache_a.slot) == int(cache_b.slot) == 10


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; run by scripts/gpu-check.sh")
def test_cuda_graph_capture_failure_falls_back_to_eager_once(caplog, monkeypatch):
    dec = make_decoder(varied_tiny("llama").cuda())
    step, cfg = GraphStep(dec), GenerationConfig(max_new_tokens=8)
    eager = generate(dec, [PROMPT], cfg, cache_fn=step.new_cache)

    def refuse(*a, **k):
        raise RuntimeError("not capturable")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    with caplog.at_level(logging.WARNING, logger="slimlm.generation"):
        assert generate(dec, [PROMPT], cfg, step=step, cache_fn=step.new_cache) == eager
    assert "not capturable" in step.failed
    assert sum("CUDA graph capture" in r.getMessage() for r in caplog.records) == 1
