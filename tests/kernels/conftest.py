"""The native kernels switched on for these tests (the suite's conftest switches them off), built once per session
into a temporary cache; a machine that cannot run them at all (not x86-64, no AVX2/FMA) skips with the reason."""

from __future__ import annotations

import pytest

from slimlm.kernels import reset_checks
from slimlm.kernels.native import build


@pytest.fixture(scope="session")
def native_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("slimlm_cache"))


@pytest.fixture
def native_on(monkeypatch, native_cache):
    """The native library loaded (built on first use in the session's cache); the first-use checks forgotten."""
    monkeypatch.setenv(build.ENV, "1")
    monkeypatch.setenv("SLIMLM_CACHE", native_cache)
    hardware = build.why_unsupported()
    if hardware is not None:
        pytest.skip(f"native kernels cannot run here: {hardware}")
    build.reset()
    reset_checks()
    state = build.native()
    assert state.lib is not None, state.reason  # a compiler or build problem is a failure, not a skip
    yield state
    build.reset()
    reset_checks()


@pytest.fixture(params=["native", "avx2"])
def isa(request, native_on):
    """The library as built for this CPU, and (on an AVX-512 CPU) the AVX2 code path built with -mno-avx512f."""
    if request.param == "avx2" and native_on.isa == 512:
        state = build.load(extra=("-mno-avx512f",))
        assert state.lib is not None and state.isa == 256, state.reason
        build.reset(state)
    return build.native().isa
