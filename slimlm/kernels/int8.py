"""int8 weight-only, symmetric, one scale per output row (or per tensor).

``y = (x @ q^T) * s`` with int8 codes ``q (out, in)`` and float16 scales
``s (out or 1, 1)``: the scale factors out of the sum, so the kernel never
builds a float weight.

* CPU: ``torch.ops.aten._weight_int8pack_mm(x (M, K), q int8 (N, K), s (N,))``
  (scales in ``x.dtype``; float32, bfloat16 and float16 activations), which
  reads one byte per weight instead of two or four. Its time grows linearly
  with the rows M; from :data:`CPU_LARGE_M` rows on (prefill) the generic
  form below is faster (crossover measured at M = 16..64), with the GEMM in
  float32 or bfloat16 as measured (:mod:`slimlm.kernels.prefill`).
* CPU, few rows, float32 activations: torch's kernel multiplies in bfloat16;
  slimlm's native int8 kernel (``kernels/native``, one group per row) reads
  the same bytes and multiplies in float32. Which one runs is measured per
  shape (tuner op ``int8_row``, paths ``torch`` and ``native``; fixed rule:
  torch): the native one ran the 49152x576 lm_head at one row in 1.18 ms
  against 3.32 and lost on 4096x4096 (0.95 vs 0.58 ms) on a 2-core machine.
* other devices: ``F.linear(x, q.to(x.dtype)) * s`` -- one cast of the codes
  per call, no multiply over the weight. float16 activations use the
  reference path instead: an unscaled sum of codes up to 127 may overflow it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.formats import codec
from slimlm.formats.granularity import PerChannel, PerTensor
from slimlm.formats.scheme import IntScheme, QuantizedWeight, Scheme
from slimlm.kernels import prefill, tune
from slimlm.kernels.base import SELF_CHECK_TOL, Shape, Tensors, WeightKernel, relative_error
from slimlm.kernels.device import has_aten_op, is_cpu
from slimlm.kernels.native.build import available
from slimlm.kernels.native.ops import BLOCK8, native_mm

CPU_LARGE_M = 32


def is_int8_symmetric_rowwise(scheme: Scheme) -> bool:
    """int8, symmetric, one scale per row or per tensor: the scale factors out of ``x @ q^T``."""
    return (isinstance(scheme, IntScheme) and scheme.bits == 8 and scheme.symmetric
            and isinstance(scheme.granularity, (PerChannel, PerTensor)))  # fmt: skip


class Int8WeightOnly(WeightKernel):
    """Layout: ``qweight`` int8 (out, in) and the stored float16 ``scale`` (R, 1)."""

    is_reference = False
    tune_op = "int8"  # timed against the reference per shape (slimlm.kernels.tune)
    row_op = "int8_row"  # and, on CPU at few rows, torch's kernel against the native one (reported by kernel_report)

    def __init__(self, *, cpu: bool) -> None:
        self.cpu = cpu
        self.name = "int8_weight_only_cpu" if cpu else "int8_weight_only"

    def supports(self, scheme: Scheme, shape: Shape, device: torch.device) -> bool:
        if not is_int8_symmetric_rowwise(scheme):
            return False
        if self.cpu:
            return is_cpu(device) and has_aten_op("_weight_int8pack_mm")
        return not is_cpu(device)

    def prepare(self, packed: Tensors, scheme: Scheme, shape: Shape, *, dtype: torch.dtype) -> Tensors:
        qw = codec.unpack(packed, scheme, shape)
        out = {"qweight": qw.codes.contiguous(), "scale": packed["scale"]}
        if self.cpu and _native_rows_possible(shape):  # the native kernel's float32 scales, one per row
            out["scale_f32"] = packed["scale"].float().expand(shape[0], 1).contiguous()
        return out

    def portable(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensors:
        qw = QuantizedWeight(scheme, shape, tensors["qweight"], scale=tensors["scale"].float())
        return codec.pack(qw)

    def dequantize(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        return tensors["qweight"].float() * tensors["scale"].float()  # (out, in) * (R, 1)

    def dequantize_rows(self, tensors: Tensors, scheme: Scheme, shape: Shape, ids: Tensor) -> Tensor:
        s = tensors["scale"]  # (R, 1): one per row, or one for the tensor
        s = s if s.shape[0] == 1 else s.index_select(0, ids)
        return tensors["qweight"].index_select(0, ids).float() * s.float()  # (n, in) * (n or 1, 1)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.cpu and dtype == torch.float32 else dtype

    def matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        q, s = tensors["qweight"], tensors["scale"]  # (N, K) int8, (R, 1) float16
        n = shape[0]
        if self.cpu and x.shape[0] < CPU_LARGE_M:
            if "scale_f32" in tensors and _row_path(x, tensors, shape) == "native":
                return _native_rows(x, tensors, shape).to(x.dtype)
            return _torch_rows(x, q, s, n)
        if x.dtype == torch.float16:
            return self.reference_matmul(x, tensors, scheme, shape)
        if self.cpu and prefill.has_choice(x):
            return _prefill(x, q, s, shape)
        return F.linear(x, q.to(x.dtype)) * s.to(x.dtype).reshape(1, -1)  # (M, N) * (1, R)


def _prefill(x: Tensor, q: Tensor, s: Tensor, shape: Shape) -> Tensor:
    """Many float32 rows: the unscaled sum in a float32 or a bfloat16 GEMM (slimlm.kernels.prefill), then the scale.

    Codes up to 127 are exact in bfloat16; the bf16 GEMM rounds its output to 8 bits before the scale."""
    scale = s.float().reshape(1, -1)  # (1, R)

    def f32() -> Tensor:
        return F.linear(x, q.float()) * scale

    def bf16() -> Tensor:
        return prefill.linear_bf16(x, q) * scale

    return bf16() if prefill.use_bf16(x, shape, f32=f32, bf16=bf16) else f32()


def _torch_rows(x: Tensor, q: Tensor, s: Tensor, n: int) -> Tensor:
    """Few rows through ``_weight_int8pack_mm``."""
    if x.dtype == torch.float32:
        # torch's CPU int8 kernel is ~12x slower with float32 activations than with
        # bfloat16 (0.74 vs 0.06 ms for 1x576x1536 on this machine): multiply in bf16.
        return _torch_rows(x.to(torch.bfloat16), q, s, n).float()
    # contiguous: the op reads N scales from memory and ignores a stride-0 (per-tensor) view
    scales = s.to(x.dtype).expand(n, 1).reshape(n).contiguous()  # (N,)
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scales)


def _native_rows_possible(shape: Shape) -> bool:
    """Whether the native int8 kernel can run this weight with one group per row (K in whole 16-byte blocks)."""
    return shape[1] % BLOCK8 == 0 and available()


def _native_rows(x: Tensor, tensors: Tensors, shape: Shape) -> Tensor:
    """``x @ (q * s)^T`` by the native int8 kernel, float32: the int8 codes are its symmetric layout as they are."""
    return native_mm(8, x.float(), tensors["qweight"].view(torch.uint8), tensors["scale_f32"], None, 0.0, shape[1])


# (out, in, dtype, rows bucket) -> the path last chosen in eager mode, for a graph being traced to read without
# the tuner (its keys call torch.get_num_threads, which breaks the graph; nothing can be timed in a trace)
_ROW_PATHS: dict[tuple, str] = {}


def _row_path(x: Tensor, tensors: Tensors, shape: Shape) -> str:
    """``torch`` or ``native`` for these few rows: the tuner's choice for the shape (fixed rule: torch)."""
    if torch.compiler.is_compiling():
        return _ROW_PATHS.get((shape[0], shape[1], x.dtype, tune.rows_bucket(x.shape[0])), "torch")
    t = tune.tuner()
    if t.uses_rule("int8_row"):
        return "torch"
    key = tune.make_key("int8_row", shape, x.dtype, x.shape[0], x.device)
    d = t.decision(key)
    path = d.path if d is not None else _choose(t, key, x, tensors, shape)
    _ROW_PATHS[(shape[0], shape[1], x.dtype, key.rows)] = path
    return path


def _choose(t: tune.Tuner, key: tune.Key, x: Tensor, tensors: Tensors, shape: Shape) -> str:
    tol = SELF_CHECK_TOL[torch.bfloat16]  # torch's path rounds the activations to bfloat16

    def runs() -> tune.Runs:
        return {"torch": lambda: _torch_rows(x, tensors["qweight"], tensors["scale"], shape[0]),
                "native": lambda: _native_rows(x, tensors, shape).to(x.dtype)}  # fmt: skip

    return t.choose(key, fixed="torch", candidates=runs, agree=lambda y, ref: relative_error(y, ref) <= tol)
