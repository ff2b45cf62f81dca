"""Native CPU GEMV kernels for grouped int3/int4 and int8 weights (C, AVX-512 or AVX2+FMA, OpenMP).

``gemv.c`` is compiled on first use and cached (:mod:`.build`); its layout and
the ops a compiled graph calls are in :mod:`.ops`; the kernels as
``WeightKernel`` (``int4_native_cpu``, ``int8_native_cpu``) in :mod:`.kernels`.
Where the library cannot be built or loaded (or ``SLIMLM_NATIVE=0``), the
kernels say so once in the log and do not support any scheme, so the torch
kernels are selected instead.
"""

from slimlm.kernels.native.build import Native, available, native, reset
from slimlm.kernels.native.kernels import PREFILL_M, NativeGrouped, native_group

__all__ = ["PREFILL_M", "Native", "NativeGrouped", "available", "native", "native_group", "reset"]
