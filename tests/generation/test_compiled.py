"""The compiled decode step: same tokens as eager, and a failing compiler falls back to eager cleanly."""

import logging

import pytest
import torch

from slimlm.api import apply
from slimlm.formats import parse_scheme
from slimlm.generation import CompiledStep, compile_step, generate, make_decoder
from slimlm.generation.loop import GenerationConfig
from slimlm.quant import RTN
from tests.generation.conftest import varied_tiny

PROMPT = [5, 17, 99, 230, 41]


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here")


def test_failing_compiler_falls_back_to_eager_with_one_warning(caplog):
    dec = make_decoder(varied_tiny("llama"))
    cfg = GenerationConfig(max_new_tokens=10)
    eager = generate(dec, [PROMPT], cfg)
    step = CompiledStep(dec, backend=_broken_backend)
    with caplog.at_level(logging.WARNING, logger="slimlm.generation"):
        assert generate(dec, [PROMPT], cfg, step=step) == eager
    assert step.failed is not None and "no C++ compiler here" in step.failed
    warnings = [r for r in caplog.records if "torch.compile of the decode step failed" in r.getMessage()]
    assert len(warnings) == 1  # once, then eager without retrying


def test_fallback_undoes_slots_claimed_before_the_failure():
    """A graph that ran (and claimed cache slots) before a later one failed must not leave them claimed."""
    dec = make_decoder(varied_tiny("llama"))
    cache = dec.new_cache(1, 16)
    dec(torch.tensor([PROMPT]), torch.arange(5)[None], cache)
    assert cache.length == 5

    class HalfStep(CompiledStep):
        def __init__(self, decoder):
            super().__init__(decoder, backend="eager")

            def runs_then_fails(*args, **kw):
                decoder(*args, **kw)  # the slots of this step are written
                raise RuntimeError("second graph failed")

            self._compiled = runs_then_fails

    step = HalfStep(dec)
    step(torch.tensor([[7]]), torch.tensor([[5]]), cache)  # the first step runs eagerly (kernel choices)
    assert cache.length == 6 and step.failed is None
    logits = step(torch.tensor([[8]]), torch.tensor([[6]]), cache)
    assert cache.length == 7 and step.failed is not None
    ref_cache = dec.new_cache(1, 16)
    dec(torch.tensor([PROMPT]), torch.arange(5)[None], ref_cache)
    dec(torch.tensor([[7]]), torch.tensor([[5]]), ref_cache)
    torch.testing.assert_close(logits, dec(torch.tensor([[8]]), torch.tensor([[6]]), ref_cache), rtol=0, atol=0)


def test_first_step_runs_eagerly_so_kernel_choices_are_measured_outside_the_trace():
    dec = make_decoder(varied_tiny("llama"))
    traced = []

    def counting_backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    step = CompiledStep(dec, backend=counting_backend)
    cfg = GenerationConfig(max_new_tokens=3)  # a prefill, then two one-token steps
    generate(dec, [PROMPT], GenerationConfig(max_new_tokens=2), step=step)
    assert not traced  # one step so far: eager
    generate(dec, [PROMPT], cfg, step=step)
    assert traced and step.failed is None


@pytest.mark.parametrize("quantized", [False, True])
def test_compiled_step_with_cpp_wrapper_gives_eager_tokens(quantized):
    model = varied_tiny("llama")
    if quantized:  # int4 groups: torch's int4pack kernel inside the compiled graph
        apply(model, RTN(scheme=parse_scheme("int4-g32")))
    dec = make_decoder(model)
    cfg = GenerationConfig(max_new_tokens=12)
    eager = generate(dec, [PROMPT], cfg)
    step = compile_step(dec)
    assert step.cpp_wrapper  # on by default on CPU
    assert generate(dec, [PROMPT], cfg, step=step) == eager
    assert step.failed is None


@pytest.mark.parametrize("module_guards", [False, True])
def test_module_attributes_are_not_guarded_by_default(module_guards):
    """Each step checks only the guards on its inputs unless asked: a module attribute changed after the first
    compiled step recompiles with module_guards=True and is not looked at by default (the decoder is a snapshot)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    dec = make_decoder(varied_tiny("llama"))
    counter = CompileCounter()
    step = CompiledStep(dec, backend=counter, module_guards=module_guards)
    cfg = GenerationConfig(max_new_tokens=4)
    generate(dec, [PROMPT], cfg, step=step)
    assert counter.frame_count == 1
    dec.embed.padding_idx = 3  # read while tracing (None before; a forward lookup ignores it): a module guard
    generate(dec, [PROMPT], cfg, step=step)
    assert counter.frame_count == (2 if module_guards else 1)


def test_two_decoders_in_one_process_each_run_their_own_graph():
    """Without module guards nothing but the code object tells two decoders apart: each step has its own."""
    torch._dynamo.reset()
    float_model, quant_model = varied_tiny("llama"), varied_tiny("llama")
    apply(quant_model, RTN(scheme=parse_scheme("int4-g32")))
    cfg = GenerationConfig(max_new_tokens=6)
    for model in (float_model, quant_model):
        dec = make_decoder(model)
        eager = generate(dec, [PROMPT], cfg)
        step = CompiledStep(dec, backend="eager")
        assert generate(dec, [PROMPT], cfg, step=step) == eager
        assert step.failed is None
