"""The native one-pass dequantization (dequant.c) that quantized prefill runs before its GEMM: bit for bit the
codec's float32 dequantize for every code layout, and the torch form where the library is absent."""

from __future__ import annotations

import pytest
import torch

from slimlm.formats import codec, parse_scheme
from slimlm.kernels import get_kernel
from slimlm.kernels.native import build
from slimlm.kernels.native import ops as native_ops
from tests.kernels.test_native import _codes

CPU = torch.device("cpu")
# kernel -> schemes it dequantizes, each with an (out, in) shape (odd rows, several groups)
CASES = [
    ("int4_native_cpu", "int4-g32", (37, 96)), ("int4_native_cpu", "int4-g64-sym", (37, 192)),
    ("int4_native_cpu", "int3-g32", (37, 96)), ("int4_native_cpu", "int4-channel", (21, 160)),
    ("int8_native_cpu", "int8-g32-sym", (37, 96)), ("int8_native_cpu", "int8-g64", (23, 192)),
    ("int4_grouped_cpu", "int4-g32", (48, 96)), ("int4_grouped_cpu", "int4-g64-sym", (32, 192)),
    ("int8_grouped", "int8-g32-sym", (37, 96)), ("int8_grouped", "int8-g64", (23, 192)),
]  # fmt: skip


@pytest.fixture
def calls(monkeypatch):
    """How many dequantizations the library answered (not None) in the test."""
    seen = []
    real = native_ops.dequantize

    def counted(*a, **kw):
        w = real(*a, **kw)
        seen.append(w is not None)
        return w

    monkeypatch.setattr(native_ops, "dequantize", counted)
    return seen


def _dequantize(name, scheme, shape):
    packed = _codes(scheme, shape, torch.Generator().manual_seed(3), adversarial=True)
    kernel = get_kernel(name)
    tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    want = codec.dequantize(codec.unpack(packed, scheme, shape))  # (N, K) float32
    return kernel.dequantize(tensors, scheme, shape), want


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("name", "scheme", "shape"), CASES, ids=lambda v: str(v))
def test_native_dequantize_equals_the_codec_bit_for_bit(native_on, calls, name, scheme, shape, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want = _dequantize(name, parse_scheme(scheme), shape)
    finally:
        torch.set_num_threads(old)
    assert got.dtype == torch.float32 and got.shape == shape
    assert torch.equal(got, want)
    assert calls == [True]  # the library ran (the torch form would pass the comparison too)


@pytest.mark.parametrize(("name", "scheme", "shape"), CASES[:2] + CASES[6:7] + CASES[8:9], ids=lambda v: str(v))
def test_without_the_library_the_torch_form_gives_the_same_weight(monkeypatch, calls, name, scheme, shape):
    monkeypatch.setenv(build.ENV, "0")
    build.reset()
    try:
        got, want = _dequantize(name, parse_scheme(scheme), shape)
    finally:
        build.reset()
    assert torch.equal(got, want)
    assert calls in ([], [False])  # asked and refused (or never asked): the torch form answered


def test_large_rows_split_across_threads_cover_every_row(native_on):
    """Above the one-thread size every row is written once (a wrong split leaves rows of uninitialised memory)."""
    scheme, shape = parse_scheme("int4-g64"), (1000, 768)
    for _ in range(3):
        got, want = _dequantize("int4_native_cpu", scheme, shape)
        assert torch.equal(got, want)


def test_prefill_gemms_share_one_weight_buffer_and_stay_exact(native_on, monkeypatch):
    """Prefill-sized matmuls of several layers dequantize into one reused buffer; each result equals the GEMM on
    the codec's weight, also when a smaller layer follows a larger one (a stale tail must not be read)."""
    from slimlm.kernels import prefill
    from slimlm.kernels.native.kernels import PREFILL_M

    monkeypatch.setattr(prefill, "_LOCAL", type(prefill._LOCAL)())
    scheme, kernel = parse_scheme("int4-g32"), get_kernel("int4_native_cpu")
    ptrs = []
    real = prefill.weight_buffer

    def seen(shape, device):
        buf = real(shape, device)
        ptrs.append(buf.data_ptr())
        return buf

    monkeypatch.setattr(prefill, "weight_buffer", seen)
    x = torch.randn(PREFILL_M, 96, generator=torch.Generator().manual_seed(4))
    for shape in [(64, 96), (37, 96), (64, 96)]:
        packed = _codes(scheme, shape, torch.Generator().manual_seed(shape[0]), adversarial=False)
        tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
        W = codec.dequantize(codec.unpack(packed, scheme, shape))
        assert torch.equal(kernel.matmul(x, tensors, scheme, shape), torch.nn.functional.linear(x, W))
    assert len(ptrs) == 3 and len(set(ptrs)) == 1  # one buffer for all three
    monkeypatch.setattr(prefill, "BUFFER_MAX_ELEMENTS", 64 * 96 - 1)
    assert real((64, 96), CPU) is None and real((37, 96), CPU) is not None  # a weight above the cap: its own
