"""W8A8: int8 weights (symmetric, per row) times int8 activations (symmetric, per token or per tensor).

``y = (xq @ wq^T) * xs * ws^T``: activations are quantized at run time, one
absmax scale per token (``slimlm.formats.activation``) or -- the naive
baseline that activation outliers break -- one scale for the whole
activation matrix (``per_tensor=True``); the integer product
accumulates exactly in int32, then the outer product of the two scale
vectors restores the magnitude. The weight layout is the int8 weight-only
one (``qweight`` int8 (out, in), float16 ``scale`` (out, 1)).

* fast path: ``torch._int_mm(xq (M, K), wq^T (K, N)) -> int32``. On CPU any
  shape works. On CUDA it needs ``K % 8 == 0`` and ``N % 8 == 0`` and more
  than 16 rows: smaller batches (decode steps) are *padded* with zero rows to
  17 -- the weight read dominates at that size, so the padding is nearly free,
  and it keeps decode on the int8 path rather than switching numerics.
* reference: the same codes and scales multiplied in float32 (exact while
  ``127^2 * K < 2^24``, i.e. ``K <= 1040``; within float32 rounding beyond).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.formats.activation import quantize_per_token
from slimlm.formats.scheme import Scheme
from slimlm.kernels.base import Shape, Tensors
from slimlm.kernels.device import has_aten_op, is_cpu
from slimlm.kernels.int8 import Int8WeightOnly, is_int8_symmetric_rowwise

_CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA refuses M <= 16


def _rescale(acc: Tensor, xs: Tensor, ws: Tensor, dtype: torch.dtype) -> Tensor:
    """``acc (M, N) * xs (M, 1) * ws^T (1, N)`` in float32, cast to ``dtype``."""
    return (acc.float() * xs * ws.float().reshape(1, -1)).to(dtype)


def quantize_activations(x: Tensor, *, per_tensor: bool) -> tuple[Tensor, Tensor]:
    """``x (M, K) -> (codes int8 (M, K), scale float32 (M, 1))``, one scale per row or one for all."""
    if not per_tensor:
        return quantize_per_token(x)
    codes, scale = quantize_per_token(x.reshape(1, -1))  # (1, M*K), (1, 1)
    return codes.reshape(x.shape), scale.expand(x.shape[0], 1)


class W8A8(Int8WeightOnly):
    """int8 x int8 -> int32 matmul with dynamic per-token (or per-tensor) activation scales."""

    tune_op = None  # its reference quantizes activations too: not a faster exact path to time against

    def __init__(self, *, fast: bool, per_tensor: bool = False) -> None:
        super().__init__(cpu=False)
        self.fast = fast
        self.per_tensor = per_tensor
        self.is_reference = not fast
        self.name = ("w8a8_int_mm" if fast else "w8a8_reference") + ("_tensor" if per_tensor else "")

    def supports(self, scheme: Scheme, shape: Shape, device: torch.device) -> bool:
        if not is_int8_symmetric_rowwise(scheme):
            return False
        if not self.fast:
            return True
        if not has_aten_op("_int_mm"):
            return False
        out_features, in_features = shape
        return is_cpu(device) or (in_features % 8 == 0 and out_features % 8 == 0)

    def reference_matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        xq, xs = quantize_activations(x, per_tensor=self.per_tensor)  # (M, K) int8, (M, 1) float32
        acc = F.linear(xq.float(), tensors["qweight"].float())  # (M, N), exact integers up to 2^24
        return _rescale(acc, xs, tensors["scale"], x.dtype)

    def matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        if not self.fast:
            return self.reference_matmul(x, tensors, scheme, shape)
        xq, xs = quantize_activations(x, per_tensor=self.per_tensor)  # (M, K) int8, (M, 1) float32
        m = xq.shape[0]
        if not is_cpu(x.device) and m < _CUDA_MIN_ROWS:
            xq = F.pad(xq, (0, 0, 0, _CUDA_MIN_ROWS - m))  # (17, K), zero rows
        acc = torch._int_mm(xq, tensors["qweight"].t())[:m]  # (M, N) int32; wq^T is a column-major view
        return _rescale(acc, xs, tensors["scale"], x.dtype)
