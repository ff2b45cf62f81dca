"""Benchmarks that time a quantized model stop, loudly, when it did not run the fast kernels they expect.

A fast kernel that fails its first-use check falls back to the reference
path with one logged warning (``slimlm.kernels.weight_matmul``); a table
timed on that path would report the reference's speed under the kernel's
name. Call these after the warm-up (which runs the checks); ``--allow-slow``
in a benchmark turns the stop into a printed report.
"""

from __future__ import annotations

from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.kernels import WeightKernel, check_state, fallback_reason, require_fast, weight_matmul


def expect_fast(model: nn.Module, what: str, *, allow_slow: bool = False) -> None:
    """Exit non-zero with one line naming the first layer of ``model`` not on a fast kernel, and why."""
    try:
        require_fast(model)
    except SlimlmError as e:
        if not allow_slow:
            raise SystemExit(f"error: {what}: {e} (--allow-slow times it anyway)") from None
        print(f"warning: {what}: {e}", flush=True)


def expect_fast_kernel(kernel: WeightKernel, x: Tensor, tensors: dict, scheme, shape, what: str) -> None:
    """The same for one kernel timed directly: it must be a fast one, and pass its first-use check on ``x``."""
    if kernel.is_reference:
        raise SystemExit(f"error: {what}: no fast kernel for {scheme!r} {shape} on {x.device.type}; "
                         f"the column would time the reference path")  # fmt: skip
    weight_matmul(kernel, x, tensors, scheme, shape)  # runs the first-use check if it has not run
    if check_state(kernel.name, x.device.type, x.dtype) is False:
        raise SystemExit(f"error: {what}: kernel {kernel.name} {fallback_reason(kernel.name, x.device.type, x.dtype)}")
