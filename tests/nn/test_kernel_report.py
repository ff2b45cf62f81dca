"""Which kernel each layer runs: a fast kernel that falls back says so, in the report, in info and to benchmarks."""

import re
import sys
from pathlib import Path

import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.formats import codec, parse_scheme
from slimlm.kernels import REFERENCE, kernel_report, kernel_summary, require_fast, reset_checks
from slimlm.kernels.int4 import Int4Grouped
from slimlm.models import format_info, model_info, tiny_model
from slimlm.prune import Magnitude
from slimlm.quant import RTN

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _int4_model():
    model = tiny_model("llama")
    apply(model, RTN(scheme="int4-g32"))  # 14 linears on int4_grouped_cpu (lm_head stays float)
    return model


def _raise(self, x, tensors, scheme, shape):
    raise RuntimeError("op missing in this build")


def _disagree(self, x, tensors, scheme, shape):
    return self.reference_matmul(x, tensors, scheme, shape) + 1.0


def test_a_healthy_model_runs_its_fast_kernel_on_every_layer():
    report = require_fast(_int4_model())
    assert report.counts == {"int4_grouped_cpu": 14}
    assert report.fallbacks == () and report.to_dict() == {"counts": {"int4_grouped_cpu": 14}, "fallbacks": {}}


@pytest.mark.parametrize("broken, why", [(_raise, "failed (op missing in this build)"),
                                         (_disagree, "disagrees with the reference (relative error")])
def test_a_fallback_is_reported_with_the_reason_recorded_when_it_happened(monkeypatch, caplog_kernels, broken, why):
    if not Int4Grouped(cpu=True).supports(RTN(scheme="int4-g32").scheme, (64, 64), torch.device("cpu")):
        pytest.fail("this torch build has no CPU int4 kernel: the test needs one to break")
    model = _int4_model()
    monkeypatch.setattr(Int4Grouped, "matmul", broken)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # the first-use check fails here, once, with one warning
    assert sum("int4_grouped_cpu" in r.message for r in caplog_kernels.records) == 1
    report = kernel_report(model, probe=False)  # what the forward pass recorded, nothing re-run
    assert report.counts == {"reference": 14}
    assert len(report.fallbacks) == 14 and report.fallbacks[0].layer == Q_PROJ
    assert report.fallbacks[0].reason.startswith(f"int4_grouped_cpu {why}")
    assert report.fallbacks[0].reason.endswith("on cpu/float32")
    with pytest.raises(SlimlmError, match=rf"14 of 14 layers are not on a fast kernel, first {Q_PROJ} \(reference\): "
                                          rf"int4_grouped_cpu {re.escape(why[:8])}"):  # fmt: skip
        require_fast(model)


def test_the_report_probes_a_layer_that_has_not_run_yet(monkeypatch):
    model = _int4_model()
    monkeypatch.setattr(Int4Grouped, "matmul", _raise)
    assert kernel_report(model, probe=False).fallbacks == ()  # nothing ran: nothing known yet
    report = kernel_report(model)  # one row through each layer runs the checks
    assert report.counts == {"reference": 14} and "op missing" in report.fallbacks[-1].reason


def test_layers_without_a_fast_kernel_and_models_without_runtime_linears_are_refused():
    model = tiny_model("llama")
    apply(model, RTN(scheme="nf4-b32"))  # NF4 has only the reference path
    assert kernel_report(model).counts == {"reference": 14}
    nf4 = r"no fast kernel for NF4Scheme\(block_size=32.* 64x64 on cpu"
    with pytest.raises(SlimlmError, match=rf"first {Q_PROJ} \(reference\): {nf4}"):
        require_fast(model)
    with pytest.raises(SlimlmError, match="no layer runs a quantized kernel"):
        require_fast(tiny_model("llama"))
    assert kernel_summary(tiny_model("llama")) is None


def test_info_shows_the_kernels_and_the_fallback(monkeypatch):
    model = _int4_model()
    text = format_info(model_info(model))
    assert "int4_grouped_cpu x14" in text and f"{Q_PROJ}" in text and "[int4_grouped_cpu]" in text
    monkeypatch.setattr(Int4Grouped, "matmul", _raise)
    reset_checks()
    info = model_info(model)
    assert info.kernels.counts == {"reference": 14}
    text = format_info(info)
    assert "reference x14" in text and "[reference]" in text
    assert f"fell back: {Q_PROJ}: int4_grouped_cpu failed (op missing in this build) on cpu/float32" in text
    assert model_info(tiny_model("llama")).kernels is None
    assert "kernels" not in format_info(model_info(tiny_model("llama")))


def _fast_module():
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        import _fast
    finally:
        sys.path.pop(0)
    return _fast


def test_a_benchmark_exits_naming_the_layer_and_reason_when_a_fast_path_was_not_taken(monkeypatch, capsys):
    fast = _fast_module()
    model = _int4_model()
    fast.expect_fast(model, "variant int4")  # healthy: no exit
    monkeypatch.setattr(Int4Grouped, "matmul", _raise)
    reset_checks()
    with pytest.raises(SystemExit) as exc:
        fast.expect_fast(model, "variant int4")
    msg = str(exc.value.code)
    assert "\n" not in msg and msg.startswith("error: variant int4: 14 of 14 layers are not on a fast kernel")
    assert Q_PROJ in msg and "op missing in this build" in msg
    fast.expect_fast(model, "variant int4", allow_slow=True)  # --allow-slow: a warning line, no exit
    assert "warning: variant int4" in capsys.readouterr().out


def test_a_kernel_benchmark_refuses_to_time_a_reference_under_a_fast_name(monkeypatch):
    fast, scheme, shape = Int4Grouped(cpu=True), parse_scheme("int4-g32"), (16, 64)
    packed = codec.pack(codec.quantize(torch.randn(shape), scheme))
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    tensors = fast.prepare(packed, scheme, shape, dtype=x.dtype)
    _fast_module().expect_fast_kernel(fast, x, tensors, scheme, shape, "int4 g32")  # passes its check
    with pytest.raises(SystemExit, match="int4 g32: no fast kernel for"):
        _fast_module().expect_fast_kernel(REFERENCE, x, packed, scheme, shape, "int4 g32")
    reset_checks()
    monkeypatch.setattr(Int4Grouped, "matmul", _disagree)
    with pytest.raises(SystemExit, match="int4 g32: kernel int4_grouped_cpu disagrees with the reference"):
        _fast_module().expect_fast_kernel(fast, x, tensors, scheme, shape, "int4 g32")


def test_pruned_layers_report_their_sparse_kernel():
    model = tiny_model("llama")
    apply(model, Magnitude(sparsity=0.5))
    report = kernel_report(model)
    assert report.counts == {"sparse-dense": 14} and report.fallbacks == ()
    assert report.layers[0].reason == "no fast kernel for sparse 50% 64x64 on cpu"
