"""Per-row symmetric int8 at a few rows: torch's kernel or the native one, as the tuner measured (op ``int8_row``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.formats import parse_scheme
from slimlm.kernels import relative_error, tune
from slimlm.nn import QuantLinear


class FakeTimer:
    """Fixed seconds per candidate; the kernel-vs-reference choice (op int8) always goes to the kernel."""

    def __init__(self, **times: float):
        self.times, self.calls = {"reference": 9.0, "fast": 1.0, **times}, []

    def __call__(self, runs):
        if "torch" in runs:
            self.calls.append(tuple(runs))
        return {name: self.times.get(name, 1.0) for name in runs}  # other ops: a tie, the simplest path


@pytest.fixture
def tuner_with(tmp_path):
    def make(text="auto", **times):
        timer = FakeTimer(**times)
        tune.reset(tune.Tuner(tune.KernelSettings.parse(text), cache_file=tmp_path / "choices.json", timer=timer,
                              fingerprint={"machine": "test"}))
        return timer
    yield make
    tune.reset()


def _layer(scheme="int8-channel-sym", shape=(37, 96)):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(shape[1], shape[0], bias=False), parse_scheme(scheme))


def _err(q, x):
    return relative_error(q(x), F.linear(x, q.dequantized_weight()))


def _row_decisions():
    return [d for d in tune.decisions() if d.key.op == "int8_row"]


@pytest.mark.parametrize("scheme", ["int8-channel-sym", "int8-tensor-sym"])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_measured_faster_native_path_runs_in_float32(native_on, tuner_with, scheme, rows):
    timer = tuner_with(torch=2.0, native=1.0)
    q = _layer(scheme)
    assert q.kernel.name == "int8_weight_only_cpu"
    x = torch.randn(rows, 96)
    assert _err(q, x) < 1e-6  # float32 throughout: torch's kernel rounds x to bfloat16 (~1e-3)
    assert [d.path for d in _row_decisions()] == ["native"] and timer.calls == [("torch", "native")]


def test_measured_faster_torch_path_keeps_torchs_kernel(native_on, tuner_with):
    tuner_with(torch=1.0, native=2.0)
    q = _layer()
    x = torch.randn(1, 96)
    assert 1e-5 < _err(q, x) < 3e-2  # the bfloat16 activations of _weight_int8pack_mm
    assert [d.path for d in _row_decisions()] == ["torch"]


def test_fixed_rule_and_native_off_run_torchs_kernel_unmeasured(native_on, tuner_with, monkeypatch):
    timer = tuner_with("fixed", torch=2.0, native=1.0)
    q = _layer()
    assert _err(q, torch.randn(1, 96)) > 1e-5 and not timer.calls and not _row_decisions()
    from slimlm.kernels.native import build

    monkeypatch.setenv(build.ENV, "0")
    build.reset()
    timer = tuner_with(torch=2.0, native=1.0)
    q = _layer()
    assert "scale_f32" not in q._weight  # no native layout without the library
    assert _err(q, torch.randn(1, 96)) > 1e-5 and not timer.calls


def test_native_scales_are_not_in_the_checkpoint_and_prefill_rows_are_not_measured(native_on, tuner_with):
    tuner_with(torch=2.0, native=1.0)
    q = _layer()
    assert "scale_f32" in q._weight and set(q.state_dict()) == set(_layer().state_dict()) and \
        "scale_f32" not in q.state_dict()
    q(torch.randn(64, 96))  # prefill-sized: the dequantize-once path, no int8_row choice
    assert not _row_decisions()


def test_the_kernel_report_says_which_one_row_path_runs(native_on, tuner_with):
    from slimlm.kernels.report import layer_kernel

    tuner_with(torch=2.0, native=1.0)
    q = _layer()
    layer = layer_kernel("lm_head", q)  # probes: the first-use check, then the one-row choices
    assert layer.runs == "int8_weight_only_cpu" and layer.reason is None
    assert "one row on its native path" in layer.why


def test_a_compiled_step_reads_the_choice_without_breaking_its_graph(native_on, tuner_with):
    """The traced step reads the eager step's choice (the tuner's keys would break the graph: a graph per layer,
    dynamo's recompile limit, and a compiled step 3x slower than eager, as measured once)."""
    from slimlm.api import apply
    from slimlm.generation import CompiledStep, generate, make_decoder
    from slimlm.generation.loop import GenerationConfig
    from slimlm.models.tiny import tiny_model
    from slimlm.quant import RTN

    tuner_with(torch=2.0, native=1.0)
    model = tiny_model("llama")
    apply(model, RTN(scheme=parse_scheme("int8-channel-sym")))
    dec = make_decoder(model)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cfg = GenerationConfig(max_new_tokens=8)
    eager = generate(dec, [[5, 17, 99, 230, 41]], cfg)
    step = CompiledStep(dec, backend=counting)
    assert generate(dec, [[5, 17, 99, 230, 41]], cfg, step=step) == eager and step.failed is None
    assert len(graphs) == 1  # one graph for every step
    targets = {str(n.target) for g in graphs for n in g.graph.nodes}
    assert any("native_q8_mm" in t for t in targets), targets
