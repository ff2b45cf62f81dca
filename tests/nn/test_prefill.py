"""Quantized prefill in float32 or bfloat16 (slimlm.kernels.prefill) and the grouped int8 kernel, against
dequantize-then-matmul of the same codes."""

import pytest
import torch
import torch.nn.functional as F

from slimlm.api import apply
from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel, PerGroup, PerTensor
from slimlm.formats.scheme import IntScheme
from slimlm.kernels import REFERENCE, kernel_report, prefill, select_weight_kernel, tune, weight_matmul
from slimlm.kernels.int4 import CPU_LARGE_M as INT4_LARGE_M
from slimlm.kernels.int8 import CPU_LARGE_M as INT8_LARGE_M
from slimlm.kernels.int8_grouped import PREFILL_M, dequantize_int8
from slimlm.models import tiny_model
from slimlm.quant import RTN
from tests.nn.test_tune import FP, FakeTimer, _tuner

INT8_GROUPED = [IntScheme(8, granularity=PerGroup(64)), IntScheme(8, symmetric=True, granularity=PerGroup(32)),
                IntScheme(8, granularity=PerChannel()), IntScheme(8, granularity=PerTensor())]  # fmt: skip
SHAPES = [(192, 576), (96, 128)]
ROWS = [1, 17, PREFILL_M, 300, 600]  # PREFILL_M: the first row count on the prefill path


@pytest.fixture(autouse=True)
def fresh_tuner():
    tune.reset()
    yield
    tune.reset()


def _packed(scheme, shape, device="cpu", seed=0):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return codec.pack(codec.quantize(W, scheme))


def _x(m, k, device="cpu", dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device=device, dtype=dtype)


def _bf16_reference(x, packed, scheme, shape):
    """Dequantize in float32, round the weight and x to bfloat16 once, bf16 GEMM, back to float32."""
    return REFERENCE.matmul(x.to(torch.bfloat16), packed, scheme, shape).float()


# -- the grouped int8 kernel -------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", INT8_GROUPED, ids=repr)
def test_int8_grouped_is_selected_and_its_layout_round_trips_exactly(device, scheme):
    shape = (96, 128)
    kernel = select_weight_kernel(scheme, shape, torch.device(device))
    assert kernel.name == "int8_grouped"
    packed = _packed(scheme, shape, device)
    t = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    back = kernel.portable(t, scheme, shape)
    assert back.keys() == packed.keys() and all(torch.equal(back[k], packed[k]) for k in packed)
    want = codec.dequantize(codec.unpack(packed, scheme, shape))
    assert torch.equal(dequantize_int8(t, shape), want)  # bit for bit: (u - z) * s is exact in float32


@pytest.mark.parametrize("scheme", INT8_GROUPED, ids=repr)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_int8_grouped_equals_the_reference_of_its_path(tmp_path, device, scheme, shape, m):
    """Below PREFILL_M rows (and for bf16 inputs) the reference's own weight and GEMM; from there on CPU float32
    the path the prefill choice names: forced f32 is the reference, forced bf16 is its bf16 rounding."""
    kernel = select_weight_kernel(scheme, shape, torch.device(device))
    packed = _packed(scheme, shape, device)
    t = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(m, shape[1], device, dtype)
        for force in ("f32", "bf16"):
            _tuner(tmp_path / force, f"fixed,prefill:{force}")
            y = kernel.matmul(x, t, scheme, shape)
            assert y.dtype == dtype and y.shape == (m, shape[0])
            bf16 = force == "bf16" and m >= PREFILL_M and dtype == torch.float32 and device == "cpu"
            want = _bf16_reference(x, packed, scheme, shape) if bf16 else REFERENCE.matmul(x, packed, scheme, shape)
            assert torch.equal(y, want)


def test_int8_grouped_model_runs_the_kernel_and_matches_the_reference_logits():
    model = tiny_model("llama")
    apply(model, RTN(scheme="int8-g32"))
    ids = torch.arange(1, PREFILL_M + 9).reshape(1, -1) % 500  # prefill-sized: 40 rows per linear
    with torch.no_grad():
        fast = model(ids).logits
        assert kernel_report(model).counts == {"int8_grouped": 14}
        for m in model.modules():
            if hasattr(m, "set_weight_kernel"):
                m.set_weight_kernel(REFERENCE)
        ref = model(ids).logits
    assert (fast - ref).norm() / ref.norm() < 1e-2  # bf16 prefill (the suite's fixed rule here) vs float32


# -- prefill paths of the int4 and per-row int8 kernels ----------------------------------------------
@pytest.mark.parametrize("scheme, shape", [(IntScheme(4, granularity=PerGroup(64)), (192, 576)),
                                           (IntScheme(4, symmetric=True, granularity=PerGroup(32)), (64, 256))])
@pytest.mark.parametrize("m", [INT4_LARGE_M, 600])
def test_int4_prefill_is_the_reference_or_its_bf16_rounding(tmp_path, scheme, shape, m):
    kernel = select_weight_kernel(scheme, shape, torch.device("cpu"))
    assert kernel.name == "int4_grouped_cpu"
    packed = _packed(scheme, shape)
    t = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    x = _x(m, shape[1])
    _tuner(tmp_path / "f32", "fixed,prefill:f32")
    assert torch.equal(kernel.matmul(x, t, scheme, shape), REFERENCE.matmul(x, packed, scheme, shape))
    _tuner(tmp_path / "bf16", "fixed,prefill:bf16")
    assert torch.equal(kernel.matmul(x, t, scheme, shape), _bf16_reference(x, packed, scheme, shape))


@pytest.mark.parametrize("m", [INT8_LARGE_M, 300])
def test_int8_rowwise_prefill_paths(tmp_path, m):
    scheme, shape = IntScheme(8, symmetric=True, granularity=PerChannel()), (192, 576)
    kernel = select_weight_kernel(scheme, shape, torch.device("cpu"))
    packed = _packed(scheme, shape)
    t = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    x = _x(m, shape[1])
    q, s = t["qweight"], t["scale"].float().reshape(1, -1)  # (N, K) int8, (1, N)
    _tuner(tmp_path / "f32", "fixed,prefill:f32")
    assert torch.equal(kernel.matmul(x, t, scheme, shape), F.linear(x, q.float()) * s)
    _tuner(tmp_path / "bf16", "fixed,prefill:bf16")
    want = F.linear(x.bfloat16(), q.bfloat16()).float() * s  # codes exact in bf16; the sum rounded, then scaled
    assert torch.equal(kernel.matmul(x, t, scheme, shape), want)


# -- the choice ----------------------------------------------------------------------------------------
def _int4_layer():
    scheme, shape = IntScheme(4, granularity=PerGroup(64)), (192, 576)
    kernel = select_weight_kernel(scheme, shape, torch.device("cpu"))
    packed = _packed(scheme, shape)
    return kernel, kernel.prepare(packed, scheme, shape, dtype=torch.float32), packed, scheme, shape


@pytest.mark.parametrize("mode", ["auto", "fixed", "measure"])
def test_prefill_stays_float32_unless_asked_and_is_never_measured(tmp_path, mode):
    """bfloat16 activations change evaluation numbers: no mode picks them on its own, however fast."""
    kernel, t, packed, scheme, shape = _int4_layer()
    timer = FakeTimer(f32=2.0, bf16=1.0)
    _tuner(tmp_path, mode, timer=timer)
    for m in (INT4_LARGE_M, 600):
        x = _x(m, shape[1])
        assert torch.equal(weight_matmul(kernel, x, t, scheme, shape), REFERENCE.matmul(x, packed, scheme, shape))
    kernel.matmul(_x(1, shape[1]), t, scheme, shape)  # decode: the int4 kernel, no prefill choice
    kernel.matmul(_x(INT4_LARGE_M, shape[1]).bfloat16(), t, scheme, shape)  # bf16 input: nothing to choose
    assert timer.calls == [] and not [d for d in tune.decisions() if d.key.op == "prefill"]


@pytest.mark.skipif(not prefill.bf16_supported(), reason="this CPU has no native bfloat16 GEMM: the force is ignored")
def test_prefill_bf16_when_asked_is_checked_recorded_and_used(tmp_path):
    kernel, t, packed, scheme, shape = _int4_layer()
    _tuner(tmp_path, "prefill:bf16", timer=FakeTimer(f32=1.0, bf16=2.0), fingerprint=FP)
    x = _x(INT4_LARGE_M, shape[1])
    assert torch.equal(kernel.matmul(x, t, scheme, shape), _bf16_reference(x, packed, scheme, shape))
    (d,) = [d for d in tune.decisions() if d.key.op == "prefill"]
    assert d.path == "bf16" and d.source == "forced"


def test_a_prefill_force_is_validated(tmp_path):
    assert tune.KernelSettings.parse("prefill:bf16").force("prefill") == "bf16"
    with pytest.raises(Exception, match="prefill has no path 'fp16'; valid: f32, bf16"):
        tune.KernelSettings.parse("prefill:fp16")
    kernel, t, packed, scheme, shape = _int4_layer()
    _tuner(tmp_path, "prefill:f32", timer=FakeTimer(f32=2.0, bf16=1.0), fingerprint=FP)
    x = _x(INT4_LARGE_M, shape[1])
    assert torch.equal(kernel.matmul(x, t, scheme, shape), REFERENCE.matmul(x, packed, scheme, shape))
