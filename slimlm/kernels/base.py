"""The weight-kernel interface, the reference path, and the first-use guard.

A *weight kernel* computes ``y = x @ W^T`` for a quantized ``W (out, in)``
kept in the kernel's own layout. Every kernel converts from the portable
packed form that :func:`slimlm.formats.codec.pack` writes (``prepare``) and
back, exactly (``portable``), so a checkpoint never depends on which kernel
ran. :class:`WeightKernel` itself is the reference path: it keeps the
portable tensors as they are and, on every call, dequantizes to the
activation dtype and runs ``F.linear``. The dequantized weight is never
cached: that would give back the memory quantization saved.

:func:`weight_matmul` runs a fast kernel through a guard: the first call per
(kernel, device type, dtype) is checked against dequantize-then-matmul of
the same codes; a kernel that raises or disagrees is switched off for that
key with a logged warning and the reference path answers from then on. The
reason is kept (:func:`fallback_reason`) so that a report of which kernel
each layer runs (:mod:`slimlm.kernels.report`) can name it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.formats import codec
from slimlm.formats.rows import rows_of
from slimlm.formats.scheme import Scheme
from slimlm.kernels import tune

log = logging.getLogger("slimlm.kernels")

Tensors = dict[str, Tensor]
Shape = tuple[int, int]

# Relative error (Frobenius) allowed between a fast kernel and the reference on
# first use: float32 accumulates in a different order; half types round the
# dequantized weight, the scales and the output to 8 or 11 mantissa bits.
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}

# (kernel name, device type, dtype) -> passed its first-use check (True) or not (False)
_CHECKED: dict[tuple[str, str, torch.dtype], bool] = {}
# the same keys -> why the kernel was switched off (for those that failed)
_REASONS: dict[tuple[str, str, torch.dtype], str] = {}


class WeightKernel:
    """Reference kernel: portable tensors kept as packed, dequantize per call."""

    name = "reference"
    is_reference = True
    tune_op: str | None = None  # the op of slimlm.kernels.tune.CANDIDATES this kernel is timed as, if any

    def supports(self, scheme: Scheme, shape: Shape, device: torch.device) -> bool:
        return True

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype activations of ``dtype`` are multiplied in (the self-check tolerance follows it)."""
        return dtype

    def prepare(self, packed: Tensors, scheme: Scheme, shape: Shape, *, dtype: torch.dtype) -> Tensors:
        """This kernel's layout of the portable ``packed`` tensors (done once, at load)."""
        return dict(packed)

    def portable(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensors:
        """Exact inverse of :meth:`prepare`: the tensors ``codec.pack`` wrote."""
        return dict(tensors)

    def dequantize(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        """The float32 weight ``(out, in)`` the tensors stand for."""
        return codec.dequantize(codec.unpack(self.portable(tensors, scheme, shape), scheme, shape))

    def dequantize_rows(self, tensors: Tensors, scheme: Scheme, shape: Shape, ids: Tensor) -> Tensor:
        """Rows ``ids`` (1-D int64) of :meth:`dequantize`'s weight, ``(len(ids), in)`` float32, bit for bit,
        from those rows' stored tensors alone (a table lookup: :mod:`slimlm.formats.rows`)."""
        packed = rows_of(self.portable(tensors, scheme, shape), scheme, ids)
        return codec.dequantize(codec.unpack(packed, scheme, (ids.numel(), shape[1])))

    def reference_matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        """``x (M, in) -> (M, out)`` by dequantize-then-matmul in ``x.dtype``."""
        return F.linear(x, self.dequantize(tensors, scheme, shape).to(x.dtype))

    def matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        """``x (M, in) -> (M, out)`` in ``x.dtype``; fast kernels override this."""
        return self.reference_matmul(x, tensors, scheme, shape)

    def __repr__(self) -> str:
        return self.name


REFERENCE = WeightKernel()


def relative_error(y: Tensor, ref: Tensor) -> float:
    """``||y - ref|| / ||ref||`` in float32 (0 when both are zero)."""
    num = (y.float() - ref.float()).norm()
    den = ref.float().norm()
    return float(num / den) if den > 0 else float(num)


def _fall_back(key: tuple, reason: str) -> None:
    log.warning("kernel %s %s on %s/%s; using the reference path", key[0], reason, key[1], key[2])
    _CHECKED[key] = False
    _REASONS[key] = reason


def _first_use(kernel: WeightKernel, key: tuple, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
    ref = kernel.reference_matmul(x, tensors, scheme, shape)
    try:
        y = kernel.matmul(x, tensors, scheme, shape)
    except RuntimeError as e:  # an op missing or refusing this build/device: not a bug in the caller
        _fall_back(key, f"failed ({e})")
        return ref
    err = relative_error(y, ref)
    tol = SELF_CHECK_TOL.get(kernel.compute_dtype(x.dtype), 1e-4)
    if not err <= tol:
        _fall_back(key, f"disagrees with the reference (relative error {err:.2e} > {tol:.0e})")
        return ref
    log.debug("kernel %s passed its first-use check on %s/%s (%.2e)", kernel.name, key[1], key[2], err)
    _CHECKED[key] = True
    return y


def weight_matmul(kernel: WeightKernel, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
    """``x (M, in) -> (M, out)`` with ``kernel``, guarded by its first-use check."""
    if kernel.is_reference:
        return kernel.matmul(x, tensors, scheme, shape)
    key = (kernel.name, x.device.type, x.dtype)
    state = _CHECKED.get(key)
    if state is None:
        return _first_use(kernel, key, x, tensors, scheme, shape)
    if state and not _measured_reference(kernel, x, tensors, scheme, shape):
        return kernel.matmul(x, tensors, scheme, shape)
    return kernel.reference_matmul(x, tensors, scheme, shape)


def _measured_reference(kernel: WeightKernel, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> bool:
    """Whether the tuner chose the reference path over ``kernel`` for this input (False: keep the kernel)."""
    op = kernel.tune_op
    t = tune.tuner()
    if op is None or t.uses_rule(op) or torch.compiler.is_compiling():
        return False
    key = tune.make_key(op, shape, x.dtype, x.shape[0], x.device)
    d = t.decision(key)  # the hot path: one dict lookup
    if d is not None:
        return d.path == "reference"
    tol = SELF_CHECK_TOL.get(kernel.compute_dtype(x.dtype), 1e-4)

    def runs() -> tune.Runs:
        return {"reference": lambda: kernel.reference_matmul(x, tensors, scheme, shape),
                "fast": lambda: kernel.matmul(x, tensors, scheme, shape)}  # fmt: skip

    path = t.choose(key, fixed="fast", candidates=runs, agree=lambda y, ref: relative_error(y, ref) <= tol)
    return path == "reference"


def check_state(name: str, device_type: str, dtype: torch.dtype) -> bool | None:
    """Kernel ``name``'s first-use verdict on ``device_type``/``dtype``: passed, failed, or None (not run yet)."""
    return _CHECKED.get((name, device_type, dtype))


def fallback_reason(name: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why kernel ``name`` was switched off on ``device_type``/``dtype`` (recorded when it fell back), else None."""
    return _REASONS.get((name, device_type, dtype))


def reset_checks() -> None:
    """Forget first-use results (tests use this to re-run the checks)."""
    _CHECKED.clear()
    _REASONS.clear()
