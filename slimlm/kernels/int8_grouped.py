"""int8 weight-only with a scale (and zero) per group, or asymmetric per row / per tensor.

The scale varies along the input dimension (groups), or a zero point adds a
term per row, so it does not factor out of ``x @ q^T`` as in ``int8.py``.
The generic reference path unpacks the codes through the codec (a bit
unpacker working per code, an int16 offset, two casts) and then
dequantizes: about 4x the time of a float32 GEMV at one row. This kernel
reads the stored bytes directly, since 8-bit packing stores one code per
byte: ``u`` uint8 ``(out, in)`` (symmetric codes offset by 128), and forms

    w = (u - z) * s        per group, z = 128 when symmetric

in one float32 expression over the ``(R, g, G)`` view. ``u - z`` (at most
9 bits) times the float16 scale (11 significant bits) is exact in float32,
so the weight equals the codec's dequantize bit for bit, and at decode sizes
the output equals the reference path's. Prefill-sized float32 inputs
(:data:`PREFILL_M` rows or more, on CPU) run the GEMM in float32 or
bfloat16 as measured (:mod:`slimlm.kernels.prefill`).

A per-group matmul (``_weight_int8pack_mm`` on each group's columns, the
zero term as one small matmul of group sums) was slower at every size
measured here (SmolLM2 shapes, 1 and 512 rows), so it is not offered.

Which of this kernel and the reference runs at decode sizes is measured per
shape (the ``int8_group`` op of :mod:`slimlm.kernels.tune`). The layout is
the portable tensors themselves, so ``portable(prepare(p))`` is ``p``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.formats.scheme import IntScheme, Scheme
from slimlm.kernels import prefill
from slimlm.kernels.base import Shape, Tensors, WeightKernel
from slimlm.kernels.native import ops as native_ops
from slimlm.kernels.int8 import is_int8_symmetric_rowwise

PREFILL_M = 32  # rows from which float32 inputs on CPU may multiply in bfloat16
SYMMETRIC_OFFSET = 128.0  # symmetric int8 codes q are stored as u = q + 128
_PORTABLE_KEYS = ("codes", "scale", "zero")


def is_int8_grouped(scheme: Scheme) -> bool:
    """int8 whose scale does not factor out of the sum: per group, or asymmetric (per row or tensor)."""
    return isinstance(scheme, IntScheme) and scheme.bits == 8 and not is_int8_symmetric_rowwise(scheme)


def dequantize_int8(tensors: Tensors, shape: Shape, out: Tensor | None = None) -> Tensor:
    """``(u - z) * s`` in float32 ``(out, in)`` from the stored bytes: equal to the codec's dequantize (the
    native library's one pass where it runs)."""
    w = native_ops.dequantize(tensors["codes"], native_ops.LAYOUT_U8, tensors["scale"], tensors.get("zero"),
                              SYMMETRIC_OFFSET, shape, out)  # fmt: skip
    if w is not None:
        return w
    s = tensors["scale"].float()  # (R, g)
    r, g = s.shape
    u = tensors["codes"].reshape(r, g, -1).float()  # (R, g, G)
    zero = tensors.get("zero")
    z = zero.float().unsqueeze(-1) if zero is not None else SYMMETRIC_OFFSET  # (R, g, 1) or a number
    return ((u - z) * s.unsqueeze(-1)).reshape(shape)  # (out, in)


class Int8Grouped(WeightKernel):
    """Layout: the portable ``codes`` uint8 ``(out, in)``, ``scale`` float16 ``(R, g)``, ``zero`` if asymmetric."""

    name = "int8_grouped"
    is_reference = False
    tune_op = "int8_group"  # timed against the reference per shape (slimlm.kernels.tune)

    def supports(self, scheme: Scheme, shape: Shape, device: torch.device) -> bool:
        return is_int8_grouped(scheme)

    def prepare(self, packed: Tensors, scheme: Scheme, shape: Shape, *, dtype: torch.dtype) -> Tensors:
        return self.portable(packed, scheme, shape)

    def portable(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensors:
        return {k: tensors[k] for k in _PORTABLE_KEYS if k in tensors}

    def dequantize(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        return dequantize_int8(tensors, shape)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if dtype == torch.float32 else dtype  # prefill on CPU may multiply in bf16

    def matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        if x.shape[0] >= PREFILL_M:
            buffer = prefill.weight_buffer(shape, x.device)
            return prefill.dequantized_matmul(x, shape, lambda: dequantize_int8(tensors, shape, buffer))
        return F.linear(x, dequantize_int8(tensors, shape).to(x.dtype))
