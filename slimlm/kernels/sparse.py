"""Matmul kernels for pruned weights (``SparseLinear``): what each device gets.

A sparse kernel turns the dense pruned weight ``W (out, in)`` (zeros where
pruned, decompressed once when the module is built or loaded) into its own
layout and multiplies by it. The portable stored form (values + bitmask or
N:M indices) lives in :mod:`slimlm.nn.sparse_linear`; kernels never see it.

==========================  ==================================================  ===========
kernel                      what it does                                        where
==========================  ==================================================  ===========
``sparse-dense``            the decompressed weight cached, ``F.linear``        everywhere (reference)
``sparse-csr``              ``torch.sparse`` CSR, ``W @ x^T``                    CPU, on request
``sparse-2:4-cuda``         ``to_sparse_semi_structured`` (sparse tensor cores)  CUDA sm80+, 2:4, fp16/bf16,
                                                                                on request
==========================  ==================================================  ===========

Measured on this 2-core CPU (one thread, 576x1536 at 50%): the cached dense
weight runs a 1-token product in 0.07 ms and a 512-token one in 9 ms; CSR
takes 0.5 ms and 25 ms. CPUs have no sparse matmul units, so ``sparse-dense``
is the CPU choice: unstructured and N:M models run at dense speed and use
dense memory at run time; their gain is on disk. Measured on an H200 (torch
2.11, ``benchmarks/gpu.py``): the 2:4 kernel is correct (tests/prune, run by
``scripts/gpu-check.sh``) but took ~0.5 ms a call at 4096x4096 whatever the
rows, 0.05x the dense bfloat16 linear at one row and 0.29-0.66x at 4096 rows,
so no device selects it by default; ask for it by name.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.sparse import to_sparse_semi_structured

from slimlm.errors import SlimlmError
from slimlm.kernels.base import Tensors
from slimlm.kernels.device import is_cpu, is_cuda_sm80

NMPair = tuple[int, int] | None  # (n, m) of an N:M pattern, None for unstructured


class DenseSparse:
    """Reference: the decompressed weight kept dense, ``F.linear``."""

    name = "sparse-dense"
    is_reference = True
    tune_op: str | None = None  # not timed against the reference (slimlm.kernels.tune); weight_matmul reads it

    def supports(self, nm: NMPair, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def prepare(self, W: Tensor, *, dtype: torch.dtype) -> Tensors:
        """This kernel's layout of the dense pruned weight ``W (out, in)``."""
        return {"weight": W.to(dtype).contiguous()}

    def dense(self, t: Tensors) -> Tensor:
        """The dense weight ``(out, in)`` the layout holds."""
        return t["weight"]

    def reference_matmul(self, x: Tensor, t: Tensors, scheme: object = None, shape: object = None) -> Tensor:
        """``x (M, in) -> (M, out)`` in ``x.dtype``."""
        return F.linear(x, self.dense(t).to(x.dtype))

    def matmul(self, x: Tensor, t: Tensors, scheme: object = None, shape: object = None) -> Tensor:
        return self.reference_matmul(x, t)

    def __repr__(self) -> str:
        return self.name


class CSRSparse(DenseSparse):
    """``torch.sparse`` CSR on CPU: stores only the kept weights, but is slower than dense here."""

    name = "sparse-csr"
    is_reference = False

    def supports(self, nm: NMPair, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
        return is_cpu(device) and dtype in (torch.float32, torch.float64)

    def prepare(self, W: Tensor, *, dtype: torch.dtype) -> Tensors:
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured here
            warnings.simplefilter("ignore", UserWarning)
            return {"csr": W.to(dtype).to_sparse_csr()}

    def dense(self, t: Tensors) -> Tensor:
        return t["csr"].to_dense()

    def matmul(self, x: Tensor, t: Tensors, scheme: object = None, shape: object = None) -> Tensor:
        csr = t["csr"]
        return (csr @ x.to(csr.dtype).t()).t().to(x.dtype)  # (out, in) @ (in, M) -> (M, out)


class SemiStructured24(DenseSparse):
    """2:4 on NVIDIA sparse tensor cores (``torch.sparse.to_sparse_semi_structured``); by name only (see below)."""

    name = "sparse-2:4-cuda"
    is_reference = False

    def supports(self, nm: NMPair, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
        out_f, in_f = shape
        return (nm == (2, 4) and is_cuda_sm80(device) and dtype in (torch.float16, torch.bfloat16)
                and out_f % 64 == 0 and in_f % 64 == 0)  # fmt: skip

    def prepare(self, W: Tensor, *, dtype: torch.dtype) -> Tensors:
        return {"semi": to_sparse_semi_structured(W.to(dtype).contiguous())}

    def dense(self, t: Tensors) -> Tensor:
        return t["semi"].to_dense()

    def matmul(self, x: Tensor, t: Tensors, scheme: object = None, shape: object = None) -> Tensor:
        w = t["semi"]
        return F.linear(x.to(w.dtype), w).to(x.dtype)


SPARSE_REFERENCE = DenseSparse()
# Tried in order; the first that supports wins. Empty: on an H200 (torch 2.11, cuSPARSELt) the 2:4 kernel ran
# 0.05-0.66x the dense bfloat16 linear at 1..4096 rows (benchmarks/gpu.py, RESULTS.md "GPU"), so it runs only
# when asked for by name (SparseLinear.from_linear(..., kernel="sparse-2:4-cuda"), set_kernel).
SPARSE_FAST: tuple[DenseSparse, ...] = ()
SPARSE_KERNELS: dict[str, DenseSparse] = {k.name: k for k in (SPARSE_REFERENCE, CSRSparse(), SemiStructured24())}


def select_sparse_kernel(nm: NMPair, shape: tuple[int, int], device: torch.device, dtype: torch.dtype, *,
                         name: str | None = None) -> DenseSparse:  # fmt: skip
    """The kernel a pruned linear uses: ``name`` if given (and supported), else the fastest available."""
    device = torch.device(device)
    if name is not None:
        kernel = SPARSE_KERNELS.get(name)
        if kernel is None:
            raise SlimlmError(f"unknown sparse kernel {name!r}; valid: {', '.join(SPARSE_KERNELS)}")
        if not kernel.supports(nm, shape, device, dtype):
            raise SlimlmError(f"sparse kernel {name} does not run {dtype} {shape} on {device.type}")
        return kernel
    return next((k for k in SPARSE_FAST if k.supports(nm, shape, device, dtype)), SPARSE_REFERENCE)
