"""The one table of kernels, and the choice of one for a scheme, shape and device.

Weight-only kernels are tried in :data:`WEIGHT_ONLY_KERNELS` order; the first
that supports the scheme, weight shape and device wins, else the reference
path (dequantize per call, then ``F.linear``) -- which is what 2/5..7-bit
int, per-channel 3/4-bit, NF4, k-means, ternary and binary weights use on
every device.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.scheme import Scheme
from slimlm.kernels.base import REFERENCE, Shape, WeightKernel
from slimlm.kernels.int4 import Int4Grouped
from slimlm.kernels.int8 import Int8WeightOnly
from slimlm.kernels.int8_grouped import Int8Grouped
from slimlm.kernels.native import NativeGrouped
from slimlm.kernels.w8a8 import W8A8

WEIGHT_ONLY_KERNELS: tuple[WeightKernel, ...] = (
    Int8WeightOnly(cpu=True),
    Int8WeightOnly(cpu=False),
    Int4Grouped(cpu=True),
    Int4Grouped(cpu=False),
    # slimlm's C kernels (kernels/native): 3/4-bit where torch's int4 kernel does not apply (it is as fast at
    # one row, and a compiled step calls it without Python); per-group int8 (Q8_0) 9-20x int8_grouped
    NativeGrouped(bits=4),
    NativeGrouped(bits=8),
    Int8Grouped(),
)
W8A8_KERNELS: tuple[WeightKernel, ...] = (W8A8(fast=True),)
W8A8_REFERENCE = W8A8(fast=False)
# Per-tensor activation scales: the naive W8A8 baseline.
W8A8_TENSOR_KERNELS: tuple[WeightKernel, ...] = (W8A8(fast=True, per_tensor=True),)
W8A8_TENSOR_REFERENCE = W8A8(fast=False, per_tensor=True)

KERNELS: dict[str, WeightKernel] = {
    k.name: k
    for k in (REFERENCE, *WEIGHT_ONLY_KERNELS, *W8A8_KERNELS, W8A8_REFERENCE, *W8A8_TENSOR_KERNELS,
              W8A8_TENSOR_REFERENCE)
}  # fmt: skip


def _first(
    kernels: tuple[WeightKernel, ...], scheme: Scheme, shape: Shape, device: torch.device
) -> WeightKernel | None:
    return next((k for k in kernels if k.supports(scheme, shape, torch.device(device))), None)


def select_weight_kernel(scheme: Scheme, shape: Shape, device: torch.device, *, fast: bool = True) -> WeightKernel:
    """The kernel a weight-only quantized linear of ``shape`` in ``scheme`` uses on ``device``."""
    kernel = _first(WEIGHT_ONLY_KERNELS, scheme, shape, device) if fast else None
    return kernel or REFERENCE


def select_w8a8_kernel(scheme: Scheme, shape: Shape, device: torch.device, *, fast: bool = True,
                       per_tensor: bool = False) -> WeightKernel:  # fmt: skip
    """The kernel a W8A8 linear uses: ``torch._int_mm`` where it applies, else float reference.

    ``per_tensor`` picks one activation scale per call instead of one per token."""
    if not W8A8_REFERENCE.supports(scheme, shape, device):
        raise SlimlmError(f"W8A8 needs int8 symmetric per-channel weights, got {scheme!r}")
    if per_tensor:
        kernel = _first(W8A8_TENSOR_KERNELS, scheme, shape, device) if fast else None
        return kernel or W8A8_TENSOR_REFERENCE
    kernel = _first(W8A8_KERNELS, scheme, shape, device) if fast else None
    return kernel or W8A8_REFERENCE


def get_kernel(name: str) -> WeightKernel:
    """The kernel registered under ``name`` (names appear in ``extra_repr``)."""
    if name not in KERNELS:
        raise SlimlmError(f"unknown kernel {name!r}; valid: {', '.join(KERNELS)}")
    return KERNELS[name]
