"""Fast kernels against dequantize-then-matmul of the same codes (quantization error taken out)."""

import pytest
import torch

from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel, PerGroup, PerTensor
from slimlm.formats.scheme import IntScheme, NF4Scheme
from slimlm.kernels import REFERENCE, WeightKernel, relative_error, select_w8a8_kernel, select_weight_kernel
from slimlm.kernels import weight_matmul
from slimlm.kernels.int4 import scale_zeros, unpack_codes

# Kernel vs reference: the same codes, so only accumulation order and the
# activation dtype's rounding differ.
TIGHT = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _prepared(scheme, shape, device, dtype, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g).to(device)
    kernel = select_weight_kernel(scheme, shape, torch.device(device))
    packed = codec.pack(codec.quantize(W, scheme))
    return kernel, kernel.prepare(packed, scheme, shape, dtype=dtype), packed


def _x(m, k, device, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_weight_only_matches_reference(device, dtype, m):
    scheme, shape = IntScheme(8, symmetric=True, granularity=PerChannel()), (96, 576)
    kernel, t, _ = _prepared(scheme, shape, device, dtype)
    assert not kernel.is_reference
    x = _x(m, 576, device, dtype)
    y = kernel.matmul(x, t, scheme, shape)
    assert y.dtype == dtype and y.shape == (m, 96)
    assert relative_error(y, kernel.reference_matmul(x, t, scheme, shape)) < TIGHT[kernel.compute_dtype(dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "group", "symmetric"), [
    ((1536, 576), 64, False), ((576, 1536), 128, False), ((64, 256), 32, False),
    ((64, 512), 256, False), ((32, 576), 64, True),
])  # fmt: skip
@pytest.mark.parametrize("m", [5, 300])  # decode-sized and prefill-sized batches take different paths
@pytest.mark.parametrize("bits", [4, 3])  # 3-bit codes run on the int4 kernel
def test_int4_grouped_matches_reference(device, dtype, shape, group, symmetric, m, bits):
    scheme = IntScheme(bits, symmetric=symmetric, granularity=PerGroup(group))
    kernel, t, packed = _prepared(scheme, shape, device, dtype)
    if device == "cpu":
        assert kernel.name == "int4_grouped_cpu"
    x = _x(m, shape[1], device, dtype)
    y = kernel.matmul(x, t, scheme, shape)
    assert y.dtype == dtype
    assert relative_error(y, REFERENCE.matmul(x, packed, scheme, shape)) < TIGHT[kernel.compute_dtype(dtype)]
    assert torch.equal(kernel.dequantize(t, scheme, shape), codec.dequantize(codec.unpack(packed, scheme, shape)))


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_zero_convention_is_exact(bits, symmetric):
    """torch's (u - 8) * s + t equals slimlm's (u - z) * s for every stored code u (2, 3 and 4 bits)."""
    scheme, shape = IntScheme(bits, symmetric=symmetric, granularity=PerGroup(64)), (16, 128)
    _, t, packed = _prepared(scheme, shape, "cpu", torch.float32)
    qw = codec.unpack(packed, scheme, shape)
    sz = scale_zeros(packed, torch.float32, bits=bits)  # (g, N, 2)
    s, off = sz[..., 0].t(), sz[..., 1].t()  # (N, g)
    u = unpack_codes(packed["codes"], bits, 128).float().reshape(16, 2, 64)  # (N, g, G) stored codes
    assert u.max() <= 2**bits - 1
    torch_w = ((u - 8) * s.unsqueeze(-1) + off.unsqueeze(-1)).reshape(shape)
    assert torch.equal(torch_w, codec.dequantize(qw))


def test_portable_round_trip_is_exact(device):
    for scheme, shape in [(IntScheme(8, symmetric=True, granularity=PerChannel()), (48, 64)),
                          (IntScheme(8, symmetric=True, granularity=PerTensor()), (48, 64)),
                          (IntScheme(4, granularity=PerGroup(64)), (1536, 576)),
                          (IntScheme(3, granularity=PerGroup(64)), (64, 576)),
                          (IntScheme(3, symmetric=True, granularity=PerGroup(32)), (64, 576)),
                          (NF4Scheme(), (48, 64))]:  # fmt: skip
        kernel, t, packed = _prepared(scheme, shape, device, torch.float32)
        back = kernel.portable(t, scheme, shape)
        assert back.keys() == packed.keys()
        assert all(torch.equal(back[k], packed[k]) for k in packed)


def test_selection_falls_back_where_the_kernel_cannot_run():
    cpu = torch.device("cpu")
    assert select_weight_kernel(IntScheme(4, granularity=PerGroup(64)), (1536, 576), cpu).name == "int4_grouped_cpu"
    assert select_weight_kernel(IntScheme(4, granularity=PerGroup(96)), (1536, 576), cpu) is REFERENCE
    assert select_weight_kernel(IntScheme(4, granularity=PerGroup(64)), (40, 576), cpu) is REFERENCE  # N % 16
    assert select_weight_kernel(IntScheme(3, granularity=PerGroup(64)), (64, 576), cpu).name == "int4_grouped_cpu"
    assert select_weight_kernel(IntScheme(5, granularity=PerGroup(64)), (64, 576), cpu) is REFERENCE
    assert select_weight_kernel(IntScheme(2, granularity=PerGroup(64)), (64, 576), cpu) is REFERENCE  # bf16 error
    assert select_weight_kernel(IntScheme(3, granularity=PerChannel()), (64, 576), cpu) is REFERENCE
    assert select_weight_kernel(IntScheme(8, granularity=PerChannel()), (64, 576), cpu).name == "int8_grouped"  # asym
    assert select_weight_kernel(IntScheme(8, symmetric=True, granularity=PerGroup(64)), (64, 576), cpu).name == (
        "int8_grouped")  # fmt: skip
    assert select_weight_kernel(NF4Scheme(), (64, 576), cpu) is REFERENCE
    assert select_weight_kernel(IntScheme(4, granularity=PerGroup(64)), (1536, 576), cpu, fast=False) is REFERENCE


@pytest.mark.parametrize("m", [1, 16, 17, 64])
def test_w8a8_int_mm_matches_float_reference(device, m):
    scheme, shape = IntScheme(8, symmetric=True, granularity=PerChannel()), (128, 576)
    W = torch.randn(shape).to(device)
    kernel = select_w8a8_kernel(scheme, shape, torch.device(device))
    assert kernel.name == "w8a8_int_mm"
    t = kernel.prepare(codec.pack(codec.quantize(W, scheme)), scheme, shape, dtype=torch.float32)
    x = _x(m, 576, device, torch.float32)
    y = kernel.matmul(x, t, scheme, shape)
    assert relative_error(y, kernel.reference_matmul(x, t, scheme, shape)) < 1e-6
    assert relative_error(y, x @ W.t()) < 0.03  # int8 x int8 error budget


class _Broken(WeightKernel):
    name, is_reference = "broken_for_test", False

    def matmul(self, x, tensors, scheme, shape):
        return super().matmul(x, tensors, scheme, shape) + 1.0


class _Raising(WeightKernel):
    name, is_reference = "raising_for_test", False

    def matmul(self, x, tensors, scheme, shape):
        raise RuntimeError("not implemented for this build")


@pytest.mark.parametrize("kernel", [_Broken(), _Raising()])
def test_failing_fast_path_falls_back_with_a_warning(kernel, caplog_kernels):
    scheme, shape = IntScheme(4, granularity=PerGroup(32)), (16, 64)
    packed = codec.pack(codec.quantize(torch.randn(shape), scheme))
    x = torch.randn(3, 64)
    ref = REFERENCE.matmul(x, packed, scheme, shape)
    for _ in range(2):  # first use checks, second uses the cached verdict
        assert torch.equal(weight_matmul(kernel, x, packed, scheme, shape), ref)
    assert sum(kernel.name in r.message for r in caplog_kernels.records) == 1
