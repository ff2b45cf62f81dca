"""slimlm.kernels.dense: oneDNN's inner product for decode-sized float32 matmuls."""

import pytest
import torch
import torch.nn.functional as F

from slimlm.generation.decoder import make_decoder
from slimlm.generation.loop import GenerationConfig, generate
from slimlm.kernels import dense
from tests.generation.conftest import varied_tiny
from tests.generation.test_loop import PROMPTS, _hf_greedy

needs_onednn = pytest.mark.skipif(not dense.onednn_available(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def all_weights(monkeypatch):
    """Route every float32 weight through oneDNN, however small (tiny test models)."""
    monkeypatch.setattr(dense, "MIN_WEIGHT", 0)


def _calls(monkeypatch) -> list[tuple[int, ...]]:
    seen = []
    namespace = torch.ops.mkldnn  # the real one: once patched, torch.ops.mkldnn is the spy itself
    real = namespace._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name != "_linear_pointwise":
                return getattr(namespace, name)
            return lambda x, *a: (seen.append(tuple(x.shape)), real(x, *a))[1]

    monkeypatch.setattr(dense.torch.ops, "mkldnn", Spy(), raising=False)
    return seen


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 96), (4, 96), (2, 3, 96), (16, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(all_weights, shape, bias):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(*shape, generator=gen), torch.randn(200, 96, generator=gen)
    b = torch.randn(200, generator=gen) if bias else None
    with torch.no_grad():
        assert dense.use_onednn(x, w)
        torch.testing.assert_close(dense.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_takes_f_linear_outside_its_domain(monkeypatch):
    w = torch.randn(600, 600)  # 360,000 elements: above MIN_WEIGHT
    small = torch.randn(8, 8)
    with torch.no_grad():
        assert dense.use_onednn(torch.randn(1, 600), w)
        assert not dense.use_onednn(torch.randn(dense.MAX_ROWS + 1, 600), w)  # prefill-sized
        assert not dense.use_onednn(torch.randn(1, 8), small)  # small weight: per-call cost wins
        assert not dense.use_onednn(torch.randn(1, 600, dtype=torch.bfloat16), w.bfloat16())
    assert not dense.use_onednn(torch.randn(1, 600), w)  # autograd on: the op has no backward
    seen = _calls(monkeypatch)
    with torch.no_grad():
        dense.linear(torch.randn(2, 600), w)
        dense.linear(torch.randn(40, 600), w)
    assert seen == [(2, 600)]


@needs_onednn
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_loop_through_onednn_equals_hf_generate(all_weights, monkeypatch, family):
    model = varied_tiny(family)
    seen = _calls(monkeypatch)
    ours = generate(make_decoder(model), PROMPTS[:2], GenerationConfig(max_new_tokens=20))
    assert seen, "the decode steps did not reach oneDNN"
    assert ours == [_hf_greedy(model, p, 20) for p in PROMPTS[:2]]


@needs_onednn
def test_compiled_step_calls_onednn_through_the_opaque_op(all_weights, monkeypatch):
    """Inductor cannot lower oneDNN's op on an unpacked weight, and its own GEMM for one float32 row is a
    one-thread GEMV: the compiled step calls slimlm::dense_linear (oneDNN when it runs), in one graph."""
    from slimlm.generation.compiled import compile_step

    dec = make_decoder(varied_tiny("llama"))
    cfg = GenerationConfig(max_new_tokens=8)
    eager = generate(dec, PROMPTS[:1], cfg)
    cache = dec.new_cache(1, 16)
    dec(torch.tensor([PROMPTS[0]]), torch.arange(len(PROMPTS[0]))[None], cache)
    explained = torch._dynamo.explain(dec)(torch.tensor([[7]]), torch.tensor([[len(PROMPTS[0])]]), cache)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    step = compile_step(dec)
    generate(dec, PROMPTS[:1], GenerationConfig(max_new_tokens=3), step=step)  # the 1st step eager, the 2nd compiles
    seen = _calls(monkeypatch)
    assert generate(dec, PROMPTS[:1], cfg, step=step) == eager and step.failed is None
    assert seen.count((1, 64)) >= 7 * 5  # the 7 compiled steps: q/k/v, o, gate/up, down of 2 layers + head
