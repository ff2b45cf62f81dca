"""The native kernels as :class:`~slimlm.kernels.base.WeightKernel`: ``int4_native_cpu``, ``int8_native_cpu``.

* ``int4_native_cpu``: 3- and 4-bit int codes, symmetric or asymmetric, one
  scale (and zero) per group of G inputs with G a multiple of 32 dividing K,
  or per row (G = K) when K is a multiple of 32.
* ``int8_native_cpu``: 8-bit codes per group (G a multiple of 16 dividing K;
  G = 32 symmetric is llama.cpp's Q8_0), or asymmetric per row. Symmetric
  per-row int8 stays with ``_weight_int8pack_mm`` (``int8.py``), whose scale
  factors out of the sum.

Float32 activations multiply in float32 (relative error ~3e-7 against the
float32 dequantize-then-matmul reference, where torch's CPU int4 kernel
rounds them to bfloat16: ~3e-3); other dtypes are widened to float32 and the
output cast back. Prefill-sized inputs (:data:`PREFILL_M` rows or more)
dequantize once and run a GEMM (:mod:`slimlm.kernels.prefill`), as the torch
kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.formats.granularity import PerChannel, PerGroup
from slimlm.formats.scheme import IntScheme, Scheme
from slimlm.kernels import prefill, tune
from slimlm.kernels.base import Shape, Tensors, WeightKernel
from slimlm.kernels.device import is_cpu
from slimlm.kernels.native.build import available
from slimlm.kernels.native.ops import BLOCK4, BLOCK8, codes_to_native, codes_to_portable, native_mm
from slimlm.kernels.native import ops
from slimlm.kernels.native.ops import native_to_unsigned

# Rows from which the dequantize-once float32 GEMM path (slimlm.kernels.prefill) takes over. Measured at 1
# thread (int4-g64 and int8-g32-sym, 576x1536 and 3072x576): the native kernel was still 1.6-1.8x faster at
# 128 rows (2.5-5x at 16); 256 is the torch int4 kernel's rule (int4.CPU_LARGE_M), not a measured crossover.
PREFILL_M = 256
_KINDS = {4: ("int4_native_cpu", "int4_native", (3, 4), BLOCK4), 8: ("int8_native_cpu", "int8_native", (8,), BLOCK8)}


def native_group(scheme: Scheme, in_features: int, bits: int) -> int | None:
    """The group size the native kernel for ``bits`` (4: 3/4-bit codes, 8) runs ``scheme`` with, or None."""
    _, _, widths, block = _KINDS[bits]
    if not isinstance(scheme, IntScheme) or scheme.bits not in widths:
        return None
    g = scheme.granularity
    if isinstance(g, PerGroup):
        size = g.size
    elif isinstance(g, PerChannel) and not (bits == 8 and scheme.symmetric):
        size = in_features
    else:
        return None
    return size if size % block == 0 and in_features % size == 0 else None


class NativeGrouped(WeightKernel):
    """Layout: ``codes_n``, ``scale_f32`` and (asymmetric) ``zero_f32`` (:mod:`slimlm.kernels.native.ops`)."""

    is_reference = False

    def __init__(self, *, bits: int) -> None:
        self.bits = bits
        self.name, self.tune_op, _, _ = _KINDS[bits]

    def supports(self, scheme: Scheme, shape: Shape, device: torch.device) -> bool:
        return is_cpu(device) and native_group(scheme, shape[1], self.bits) is not None and available()

    def prepare(self, packed: Tensors, scheme: Scheme, shape: Shape, *, dtype: torch.dtype) -> Tensors:
        out = {"codes_n": codes_to_native(packed["codes"], scheme.bits, shape[1], symmetric=scheme.symmetric),
               "scale_f32": packed["scale"].float().contiguous()}  # fmt: skip
        if "zero" in packed:
            out["zero_f32"] = packed["zero"].float().contiguous()
        return out

    def portable(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensors:
        out = {"codes": codes_to_portable(tensors["codes_n"], scheme.bits, shape[1], symmetric=scheme.symmetric),
               "scale": tensors["scale_f32"].half()}  # fmt: skip
        if "zero_f32" in tensors:
            out["zero"] = tensors["zero_f32"].half()
        return out

    def _centred(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        """``u - z`` as float32 ``(N, g, G)``."""
        n, k = shape
        g = tensors["scale_f32"].shape[1]
        codes = tensors["codes_n"]
        if self.bits == 8:
            u = (codes.view(torch.int8) if scheme.symmetric else codes).float().reshape(n, g, -1)
        else:
            u = native_to_unsigned(codes, k).float().reshape(n, g, -1)
        zero = tensors.get("zero_f32")
        if zero is not None:
            return u - zero.unsqueeze(-1)
        return u if self.bits == 8 else u - 2.0 ** (scheme.bits - 1)

    def dequantize(self, tensors: Tensors, scheme: Scheme, shape: Shape, out: Tensor | None = None) -> Tensor:
        """``(u - z) * s`` float32 ``(N, K)``: the codec's dequantize, bit for bit (the library's one pass, or
        torch's elementwise form where it cannot run)."""
        if self.bits == 8:
            layout, zc = (ops.LAYOUT_S8 if scheme.symmetric else ops.LAYOUT_U8), 0.0
        else:
            layout, zc = ops.LAYOUT_BLOCK4, 2.0 ** (scheme.bits - 1)
        w = ops.dequantize(tensors["codes_n"], layout, tensors["scale_f32"], tensors.get("zero_f32"), zc, shape,
                          out)  # fmt: skip
        if w is not None:
            return w
        return (self._centred(tensors, scheme, shape) * tensors["scale_f32"].unsqueeze(-1)).reshape(shape)

    def dequantize_rows(self, tensors: Tensors, scheme: Scheme, shape: Shape, ids: Tensor) -> Tensor:
        rows = {k: t[ids] for k, t in tensors.items()}  # every layout tensor is row-wise
        return self.dequantize(rows, scheme, (ids.numel(), shape[1]))

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype == torch.float32 and tune.tuner().settings.force("prefill") == "bf16":
            return torch.bfloat16  # prefill-sized inputs may then multiply in bfloat16 (slimlm.kernels.prefill)
        return dtype

    def matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        if x.shape[0] >= PREFILL_M:
            return prefill.dequantized_matmul(
                x, shape, lambda: self.dequantize(tensors, scheme, shape, prefill.weight_buffer(shape, x.device)))
        zc = 0.0 if self.bits == 8 else 2.0 ** (scheme.bits - 1)  # symmetric zero (8-bit codes are stored signed)
        group = shape[1] // tensors["scale_f32"].shape[1]
        y = native_mm(self.bits, x.float(), tensors["codes_n"], tensors["scale_f32"], tensors.get("zero_f32"), zc,
                      group)  # fmt: skip
        return y if x.dtype == torch.float32 else y.to(x.dtype)
