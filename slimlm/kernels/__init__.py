"""Matmul kernels for quantized weights: the only package that asks what the device is.

Every kernel has a reference path (dequantize, then ``F.linear``); fast paths
are chosen by availability (:func:`select_weight_kernel`) and checked against
the reference on first use (:func:`weight_matmul`).

====================================  ===================================  ==================================
format                                CPU                                  CUDA
====================================  ===================================  ==================================
int4/int3 G%32==0; int8 G%16==0       native C GEMV (``kernels.native``)   (see the rows below)
int8 sym, per channel/tensor          ``_weight_int8pack_mm``              ``F.linear(x, q) * s``
int4 grouped G in 32..256 (asym/sym)  ``_weight_int4pack_mm_for_cpu``      ``_weight_int4pack_mm`` (bf16)
int8 per group; asym per channel      fused ``(u - z) * s``, ``F.linear``  the same
W8A8 (int8 sym per channel weights)   ``torch._int_mm``                    ``torch._int_mm`` (M padded to 17)
everything else                       reference                            reference
====================================  ===================================  ==================================

The native rows (``int4_native_cpu``, ``int8_native_cpu``: C with AVX-512 or
AVX2+FMA, float32 accumulation, compiled on first use and cached;
``SLIMLM_NATIVE=0`` turns them off) come first where they build; the rows
below them answer otherwise.

Plain float32 weights at decode sizes (<= 16 rows) may go through oneDNN's inner
product on CPU (:func:`slimlm.kernels.dense.linear`), which uses every intra-op
thread where ATen's GEMV may use one. Whether it does, whether an int8/int4
kernel beats its own reference path, and whether prefill-sized float32 inputs
to a quantized kernel multiply in float32 or bfloat16 (:mod:`slimlm.kernels.prefill`)
is measured once per shape, rows bucket and thread count on the machine at hand
and cached (:mod:`slimlm.kernels.tune`, ``SLIMLM_KERNELS=auto|measure|fixed``,
``op:path`` forces).

:func:`kernel_report` says which path each layer of a model runs (and why a
fast kernel fell back); :func:`require_fast` makes that an error.
"""

from slimlm.kernels.base import (
    REFERENCE,
    Tensors,
    WeightKernel,
    check_state,
    fallback_reason,
    relative_error,
    reset_checks,
    weight_matmul,
)
from slimlm.kernels.report import (
    KernelReport,
    LayerKernel,
    format_kernels,
    kernel_layers,
    kernel_report,
    kernel_summary,
    report_layers,
    require_fast,
)
from slimlm.kernels.select import (
    KERNELS,
    W8A8_REFERENCE,
    get_kernel,
    select_w8a8_kernel,
    select_weight_kernel,
)

__all__ = [
    "KERNELS",
    "KernelReport",
    "LayerKernel",
    "REFERENCE",
    "W8A8_REFERENCE",
    "Tensors",
    "WeightKernel",
    "check_state",
    "fallback_reason",
    "format_kernels",
    "get_kernel",
    "kernel_layers",
    "kernel_report",
    "kernel_summary",
    "relative_error",
    "report_layers",
    "require_fast",
    "reset_checks",
    "select_w8a8_kernel",
    "select_weight_kernel",
    "weight_matmul",
]
