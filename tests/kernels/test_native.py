"""Native C kernels (slimlm.kernels.native): exact against the float32 reference on random and adversarial codes,
layouts that invert bit for bit, fallback when off or unbuildable, the build cache, and torch's thread count."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from slimlm.formats import codec, parse_scheme
from slimlm.formats.packing import pack_bits
from slimlm.kernels import check_state, relative_error, select_weight_kernel, weight_matmul
from slimlm.kernels.native import build, native_group
from slimlm.kernels.native.kernels import PREFILL_M

CPU = torch.device("cpu")
TOL = 1e-5
# scheme -> (out, in): odd rows; in = group * odd
CASES = {
    "int4-g32": (37, 96), "int4-g64-sym": (37, 192), "int4-g128": (19, 384), "int4-channel": (21, 160),
    "int3-g32": (37, 96), "int3-g64-sym": (25, 192), "int3-g128": (19, 384),
    "int8-g32-sym": (37, 96), "int8-g16": (37, 48), "int8-g64": (23, 192), "int8-g128-sym": (19, 384),
    "int8-channel": (21, 112),
}  # fmt: skip
ROWS = (1, 2, 3, 5, 8, 9, 17)  # around both register blockings (8 rows with AVX-512, 4 with AVX2)


def _codes(scheme, shape, gen, *, adversarial: bool) -> dict[str, torch.Tensor]:
    """Portable tensors of ``scheme``: random codes, float16 scales (and integer zeros). Adversarial: scales over
    2^-14..2^10, groups of all-minimum / all-maximum codes, and rows 0 and 3 of zero weights (u == z)."""
    n, k = shape
    bits, sym = scheme.bits, scheme.symmetric
    g = k // native_group(scheme, k, 8 if bits == 8 else 4)
    low = 1 if sym else 0
    u = torch.randint(low, 2**bits, (n, k), generator=gen)
    exp = torch.randint(-14, 11, (n, g), generator=gen) if adversarial else torch.full((n, g), -6)
    scale = (torch.rand(n, g, generator=gen) + 1) * 2.0 ** exp.float()
    zero = torch.full((n, g), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (n, g), generator=gen)
    if adversarial:
        groups = u.view(n, g, -1)
        groups[1::4] = low  # (n, g, G): every 4th row, all groups at the lowest code
        groups[2::4, ::2] = 2**bits - 1
        groups[[0, 3]] = zero[[0, 3]].unsqueeze(-1)  # zero weights: u == z
    out = {"codes": pack_bits(u, bits), "scale": scale.half()}
    if not sym:
        out["zero"] = zero.half()
    return out


def _x(m, k, gen, *, adversarial: bool) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    return x * 10.0 ** torch.randint(-3, 4, (m, k), generator=gen).float() if adversarial else x


@pytest.mark.parametrize("adversarial", [False, True], ids=["random", "adversarial"])
@pytest.mark.parametrize("name", list(CASES))
def test_matmul_matches_float32_reference(isa, name, adversarial):
    scheme, shape = parse_scheme(name), CASES[name]
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    packed = _codes(scheme, shape, gen, adversarial=adversarial)
    kernel = select_weight_kernel(scheme, shape, CPU)
    assert kernel.name == ("int8_native_cpu" if scheme.bits == 8 else "int4_native_cpu")
    tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    W = codec.dequantize(codec.unpack(packed, scheme, shape))  # (N, K) float32
    for m in ROWS:
        x = _x(m, shape[1], gen, adversarial=adversarial)
        y = kernel.matmul(x, tensors, scheme, shape)
        ref = F.linear(x, W)
        assert y.dtype == torch.float32 and y.shape == (m, shape[0])
        assert relative_error(y, ref) <= TOL, (m, relative_error(y, ref))
        exact = (x.double() @ W.double().t()).float()
        assert relative_error(y, exact) <= TOL, (m, relative_error(y, exact))
        if adversarial:
            assert torch.equal(y[:, [0, 3]], torch.zeros(m, 2))  # zero weights give exactly 0, no cancellation


@pytest.mark.parametrize("name", list(CASES))
def test_layout_inverts_bit_for_bit_and_dequantizes_like_the_codec(native_on, name):
    scheme, shape = parse_scheme(name), CASES[name]
    packed = _codes(scheme, shape, torch.Generator().manual_seed(1), adversarial=True)
    kernel = select_weight_kernel(scheme, shape, CPU)
    tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    back = kernel.portable(tensors, scheme, shape)
    assert back.keys() == packed.keys()
    for key, t in packed.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    W = codec.dequantize(codec.unpack(packed, scheme, shape))
    assert torch.equal(kernel.dequantize(tensors, scheme, shape), W)
    ids = torch.tensor([shape[0] - 1, 0, 3, 3])
    assert torch.equal(kernel.dequantize_rows(tensors, scheme, shape, ids), W[ids])


def test_prefill_rows_and_other_dtypes_take_the_reference_numbers(native_on):
    scheme, shape = parse_scheme("int4-g32"), (64, 96)
    packed = _codes(scheme, shape, torch.Generator().manual_seed(2), adversarial=False)
    kernel = select_weight_kernel(scheme, shape, CPU)
    tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    W = codec.dequantize(codec.unpack(packed, scheme, shape))
    x = torch.randn(PREFILL_M + 3, shape[1])
    torch.testing.assert_close(kernel.matmul(x, tensors, scheme, shape), F.linear(x, W), rtol=1e-5, atol=1e-6)
    xb = torch.randn(2, shape[1]).to(torch.bfloat16)
    yb = kernel.matmul(xb, tensors, scheme, shape)
    assert yb.dtype == torch.bfloat16
    assert relative_error(yb, F.linear(xb.float(), W)) <= 1e-2


@pytest.mark.parametrize("name, shape", [("int4-g48", (32, 96)), ("int4-g16", (32, 96)), ("int8-g8", (32, 96)),
                                         ("int8-channel-sym", (32, 96)), ("int4-channel", (32, 80)),
                                         ("int5-g32", (32, 96)), ("nf4", (32, 96))])  # fmt: skip
def test_shapes_and_schemes_outside_the_rules_go_elsewhere(native_on, name, shape):
    kernel = select_weight_kernel(parse_scheme(name), shape, CPU)
    assert "native" not in kernel.name


def test_switched_off_by_env_logs_once_and_torch_answers(monkeypatch, caplog):
    monkeypatch.setenv(build.ENV, "0")
    build.reset()
    try:
        with caplog.at_level(logging.INFO, logger="slimlm.kernels"):
            kernel = select_weight_kernel(parse_scheme("int4-g32"), (64, 96), CPU)
            select_weight_kernel(parse_scheme("int8-g32-sym"), (64, 96), CPU)
        assert kernel.name == "int4_grouped_cpu"
        assert build.native().reason == "disabled by SLIMLM_NATIVE=0"
        lines = [r.message for r in caplog.records if "native" in r.message]
        assert lines == ["native CPU kernels unavailable: disabled by SLIMLM_NATIVE=0; the torch kernels run"]
    finally:
        build.reset()


def test_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(build.ENV, "1")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))  # empty: a build is needed

    def broken(cc, dest, extra=()):
        raise OSError("gcc exited 1: gemv.c:1: error: broken on purpose")

    monkeypatch.setattr(build, "compile_library", broken)
    build.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="slimlm.kernels"):
            kernel = select_weight_kernel(parse_scheme("int8-g32-sym"), (64, 96), CPU)
            select_weight_kernel(parse_scheme("int4-g32"), (64, 96), CPU)
        assert kernel.name == "int8_grouped"
        assert build.native().reason == "build or load failed (gcc exited 1: gemv.c:1: error: broken on purpose)"
        assert sum("native CPU kernels unavailable: build or load failed" in r.message for r in caplog.records) == 1
    finally:
        build.reset()


def test_cache_second_load_does_not_rebuild(monkeypatch, tmp_path):
    monkeypatch.setenv(build.ENV, "1")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    if build.why_unsupported() is not None:
        pytest.skip(f"native kernels cannot run here: {build.why_unsupported()}")
    first = build.load()
    assert first.built and first.lib is not None and first.path.parent == tmp_path / "native"
    builds = []

    def no_build(cc, dest, extra=()):
        builds.append(extra)
        raise OSError("a build was asked for")

    monkeypatch.setattr(build, "compile_library", no_build)
    second = build.load()
    assert not second.built and second.path == first.path and second.lib is not None and builds == []
    assert [p.name for p in (tmp_path / "native").iterdir()] == [first.path.name]  # no temporary left behind
    assert build.load(extra=("-O2",)).reason is not None and builds == [("-O2",)]  # other flags: another key


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def test_threads_follow_torch_and_share_its_openmp_pool(native_on):
    lib = native_on.lib
    maps = open("/proc/self/maps").read()
    assert len({line.split()[-1] for line in maps.splitlines() if "libgomp" in line}) == 1  # one OpenMP runtime
    scheme, shape = parse_scheme("int8-g32-sym"), (512, 512)  # enough work to go parallel
    packed = _codes(scheme, shape, torch.Generator().manual_seed(3), adversarial=False)
    kernel = select_weight_kernel(scheme, shape, CPU)
    tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    W = codec.dequantize(codec.unpack(packed, scheme, shape))
    before = torch.get_num_threads()
    try:
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            assert lib.slimlm_native_omp_max_threads() == n  # torch's setting reaches the library's runtime
            torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # torch's pool at n threads
            tasks = _tasks()
            x = torch.randn(3, shape[1])
            y = kernel.matmul(x, tensors, scheme, shape)
            assert lib.slimlm_native_last_threads() == n
            assert relative_error(y, F.linear(x, W)) <= TOL  # every thread's rows
            assert _tasks() == tasks  # no second pool started
    finally:
        torch.set_num_threads(before)


def test_first_use_guard_passes_at_float32_tolerance(native_on):
    scheme, shape = parse_scheme("int8-g32-sym"), (64, 96)
    packed = _codes(scheme, shape, torch.Generator().manual_seed(4), adversarial=True)
    kernel = select_weight_kernel(scheme, shape, CPU)
    assert kernel.compute_dtype(torch.float32) == torch.float32  # the guard's tolerance: 1e-4
    tensors = kernel.prepare(packed, scheme, shape, dtype=torch.float32)
    weight_matmul(kernel, torch.randn(1, shape[1]), tensors, scheme, shape)
    assert check_state(kernel.name, "cpu", torch.float32) is True
