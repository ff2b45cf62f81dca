"""int4 weight-only with groups along the input dimension: torch's int4pack kernels.

slimlm's affine format reads ``w = (u - z) * s`` with unsigned codes ``u`` in
``[0, 15]``, an integer zero ``z`` and a float16 scale ``s`` per group
(symmetric int4 stores its signed codes offset by 8, so ``u = q + 8`` and
``z = 8``). torch's int4 kernels read ``w = (u - 8) * s + t`` with a float
offset ``t`` per group. Equal for every ``u`` when

    t = (8 - z) * s        (t = 0 when symmetric)

which is exact in float32 (``s`` has 11 significant bits, ``8 - z`` at most
5). ``scale_zeros`` packs ``(s, t)`` as ``(in // G, out, 2)`` in the
activation dtype, the layout both kernels read.

* CPU: ``_convert_weight_to_int4pack_for_cpu(u int32 (N, K))`` once, then
  ``_weight_int4pack_mm_for_cpu(x, w, G, scale_zeros)``; float32, bfloat16
  and float16 activations. Needs ``G`` in 32/64/128/256 and ``N % 16 == 0``.
* CUDA (sm80+): ``_convert_weight_to_int4pack(uint8 (N, K/2), inner_k_tiles)``
  with two codes a byte, high nibble first, then ``_weight_int4pack_mm``;
  bfloat16 activations only (others take the reference path). Needs ``G`` in
  32/64/128/256, ``N % 8 == 0`` and ``K % (16 * inner_k_tiles) == 0``.

The layout keeps the portable codes, scales and zeros beside the int4pack
tensor (it cannot be inverted cheaply), so a checkpoint is written from
them and the first-use check and fallback can dequantize.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.formats.granularity import PerGroup
from slimlm.formats.packing import unpack_bits
from slimlm.formats.rows import rows_of
from slimlm.formats.scheme import IntScheme, Scheme
from slimlm.kernels import prefill
from slimlm.kernels.base import Shape, Tensors, WeightKernel
from slimlm.kernels.native import ops as native_ops
from slimlm.kernels.device import has_aten_op, is_cpu, is_cuda_sm80

GROUP_SIZES = (32, 64, 128, 256)
BITS = (3, 4)  # codes the int4 kernel reads within bfloat16's error (module docstring)
# The CPU int4 kernel's time grows linearly with the rows M (a GEMV per row,
# roughly); dequantizing once (a fixed cost per weight) and running the dtype's
# GEMM wins from about M = 64 on 576x1536 and M = 512 on 4096x4096 (1 thread,
# benchmarks/kernel_speed.py). Prefill-sized batches take that path, multiplying in
# float32 or bfloat16 as measured (slimlm.kernels.prefill).
CPU_LARGE_M = 256
_PORTABLE_KEYS = ("codes", "scale", "zero")


def is_int4_grouped(scheme: Scheme) -> bool:
    """int 3/4-bit with groups of 32..256 along the input: codes the int4 kernel reads exactly."""
    return (isinstance(scheme, IntScheme) and scheme.bits in BITS and isinstance(scheme.granularity, PerGroup)
            and scheme.granularity.size in GROUP_SIZES)  # fmt: skip


def inner_k_tiles(in_features: int) -> int | None:
    """Largest of 8, 4, 2 with ``in_features % (16 * tiles) == 0`` (CUDA layout), else None."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def unpack_int4(codes: Tensor, in_features: int) -> Tensor:
    """Portable 4-bit codes ``(N, K/2)`` (code ``2k`` in the low nibble of byte ``k``) -> ``(N, K)`` uint8.

    The same result as ``formats.packing.unpack_bits(codes, 4, K)`` for even
    ``K``, in uint8 arithmetic (the generic unpacker works in int64).
    """
    pairs = torch.stack([codes & 0x0F, codes >> 4], dim=-1)  # (N, K/2, 2)
    return pairs.reshape(codes.shape[0], in_features)  # (N, K)


def unpack_codes(codes: Tensor, bits: int, in_features: int) -> Tensor:
    """Portable ``bits``-bit codes -> ``(N, K)`` uint8 (the 4-bit fast path, else the generic unpacker)."""
    return unpack_int4(codes, in_features) if bits == 4 else unpack_bits(codes, bits, in_features)


def scale_zeros(tensors: Tensors, dtype: torch.dtype, *, bits: int = 4) -> Tensor:
    """``(in // G, out, 2)`` pairs ``(s, (8 - z) * s)`` in ``dtype`` (see the module docstring).

    Symmetric ``bits``-bit codes (no ``zero`` tensor) sit at ``z = 2^(bits-1)``."""
    s = tensors["scale"].float()  # (N, g)
    zero = tensors.get("zero")
    z = torch.full_like(s, 2.0 ** (bits - 1)) if zero is None else zero.float()
    t = (8.0 - z) * s  # (N, g); 0 for symmetric int4
    return torch.stack([s, t], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (g, N, 2)


class Int4Grouped(WeightKernel):
    """Layout: the portable ``codes``/``scale``/``zero``, plus ``int4pack`` and ``scale_zeros``."""

    is_reference = False
    tune_op = "int4"  # timed against the reference per shape (slimlm.kernels.tune)

    def __init__(self, *, cpu: bool) -> None:
        self.cpu = cpu
        self.name = "int4_grouped_cpu" if cpu else "int4_grouped_cuda"

    def supports(self, scheme: Scheme, shape: Shape, device: torch.device) -> bool:
        if not is_int4_grouped(scheme):
            return False
        out_features, in_features = shape
        if self.cpu:
            ops = has_aten_op("_convert_weight_to_int4pack_for_cpu") and has_aten_op("_weight_int4pack_mm_for_cpu")
            return is_cpu(device) and ops and out_features % 16 == 0
        ops = has_aten_op("_convert_weight_to_int4pack") and has_aten_op("_weight_int4pack_mm")
        return is_cuda_sm80(device) and ops and out_features % 8 == 0 and inner_k_tiles(in_features) is not None

    def prepare(self, packed: Tensors, scheme: Scheme, shape: Shape, *, dtype: torch.dtype) -> Tensors:
        u = unpack_codes(packed["codes"], scheme.bits, shape[1])  # (N, K) uint8 in [0, 2^bits - 1]
        if self.cpu:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 2)
        else:
            pairs = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).contiguous()  # (N, K/2), high nibble first
            w = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(shape[1]))
            dtype = torch.bfloat16
        out = self.portable(packed, scheme, shape)
        out["int4pack"] = w
        out["scale_zeros"] = scale_zeros(packed, dtype, bits=scheme.bits)
        return out

    def portable(self, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensors:
        return {k: tensors[k] for k in _PORTABLE_KEYS if k in tensors}

    def dequantize(self, tensors: Tensors, scheme: Scheme, shape: Shape, out: Tensor | None = None) -> Tensor:
        """``(u - z) * s`` in float32 (equal to the codec's dequantize): the native library's one pass for
        4-bit codes, else from uint8 unpacking."""
        n, k = shape
        if scheme.bits == 4:
            w = native_ops.dequantize(tensors["codes"], native_ops.LAYOUT_PAIRS4, tensors["scale"], tensors.get("zero"),
                                      8.0, shape, out)  # fmt: skip
            if w is not None:
                return w
        g = k // scheme.granularity.size
        u = unpack_codes(tensors["codes"], scheme.bits, k).float().reshape(n, g, -1)  # (N, g, G)
        zero = tensors.get("zero")
        if zero is not None:
            u = u - zero.float().unsqueeze(-1)
        else:
            u = u - 2.0 ** (scheme.bits - 1)  # symmetric codes are stored offset by 2^(bits-1)
        return (u * tensors["scale"].float().unsqueeze(-1)).reshape(n, k)  # (N, K)

    def dequantize_rows(self, tensors: Tensors, scheme: Scheme, shape: Shape, ids: Tensor) -> Tensor:
        rows = rows_of(self.portable(tensors, scheme, shape), scheme, ids)  # codes, scale, zero of rows ids
        return self.dequantize(rows, scheme, (ids.numel(), shape[1]))

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.cpu and dtype == torch.float32 else dtype

    def matmul(self, x: Tensor, tensors: Tensors, scheme: Scheme, shape: Shape) -> Tensor:
        group = scheme.granularity.size
        if self.cpu and x.shape[0] >= CPU_LARGE_M:
            # Prefill: dequantize once, one GEMM in float32 or bfloat16 (slimlm.kernels.prefill).
            return prefill.dequantized_matmul(
                x, shape, lambda: self.dequantize(tensors, scheme, shape, prefill.weight_buffer(shape, x.device)))
        if self.cpu and x.dtype == torch.float32:
            # torch's CPU int4 kernel is ~25x slower with float32 activations than with
            # bfloat16 (1.5 vs 0.056 ms for 1x576x1536 on this machine): multiply in bf16.
            return self.matmul(x.to(torch.bfloat16), tensors, scheme, shape).float()
        if not self.cpu and x.dtype != torch.bfloat16:
            return self.reference_matmul(x, tensors, scheme, shape)
        sz = tensors["scale_zeros"]
        if sz.dtype != x.dtype:
            # Activations in another dtype than prepared for: re-derive the small
            # (in // G, out, 2) table once and keep it (a one-entry cache).
            sz = tensors["scale_zeros"] = scale_zeros(tensors, x.dtype, bits=scheme.bits)
        op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        return op(x.contiguous(), tensors["int4pack"], group, sz)
