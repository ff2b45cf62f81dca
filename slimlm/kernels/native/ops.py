"""The native layout (portable codes <-> ``gemv.c``'s blocks) and the matmuls as torch ops.

Layout, from the portable tensors of :mod:`slimlm.formats.codec` (``u`` the
unsigned codes, symmetric ones offset by ``2^(bits-1)``):

* 3/4-bit: ``codes_n`` uint8 ``(N, K / 2)``; per block of 32 codes, byte ``j``
  holds ``u[j] | u[j + 16] << 4`` (the portable form holds ``u[2j] | u[2j+1] << 4``;
  3-bit codes take a nibble each here).
* 8-bit: ``codes_n`` uint8 ``(N, K)``, the portable bytes; symmetric codes
  xor 0x80, i.e. ``u - 128`` as int8.
* ``scale_f32``/``zero_f32`` float32 ``(N, K / G)``: the stored float16 values
  (exact both ways), zero only when asymmetric.

Every conversion is exact, so :func:`portable` gives back the bytes
``codec.pack`` wrote and a checkpoint does not depend on the kernel.

The matmuls are registered as ``torch.library.custom_op`` (``slimlm::native_q4_mm``,
``slimlm::native_q8_mm``) with fake implementations, so a compiled decode step
keeps them in its graph. Eager calls skip the op's dispatch (about 15 us per
call here, as much as a 576x576 GEMV) and call the same function directly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from slimlm.formats.packing import pack_bits, unpack_bits
from slimlm.kernels.native.build import native

BLOCK4 = 32  # weights per 16-byte block of 3/4-bit codes
BLOCK8 = 16  # weights per 16-byte block of 8-bit codes
SYMMETRIC8 = 0x80


def codes_to_native(codes: Tensor, bits: int, in_features: int, *, symmetric: bool) -> Tensor:
    """Portable ``bits``-bit codes ``(N, bytes)`` -> native ``codes_n`` (module docstring)."""
    n = codes.shape[0]
    if bits == 8:
        return (codes ^ SYMMETRIC8 if symmetric else codes).contiguous()
    if bits == 4:
        u = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(n, in_features)  # (N, K)
    else:
        u = unpack_bits(codes, bits, in_features)  # (N, K) uint8
    blocks = u.reshape(n, in_features // BLOCK4, 2, BLOCK4 // 2)  # (N, K/32, 2, 16): [low half, high half]
    return (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(n, in_features // 2).contiguous()  # (N, K/2)


def native_to_unsigned(codes_n: Tensor, in_features: int) -> Tensor:
    """Native 3/4-bit ``codes_n (N, K/2)`` -> the codes ``u (N, K)`` uint8."""
    n = codes_n.shape[0]
    b = codes_n.reshape(n, in_features // BLOCK4, 1, BLOCK4 // 2)  # (N, K/32, 1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, in_features)  # (N, K)


def codes_to_portable(codes_n: Tensor, bits: int, in_features: int, *, symmetric: bool) -> Tensor:
    """Inverse of :func:`codes_to_native`."""
    if bits == 8:
        return codes_n ^ SYMMETRIC8 if symmetric else codes_n
    u = native_to_unsigned(codes_n, in_features)  # (N, K)
    if bits == 4:
        pairs = u.reshape(u.shape[0], in_features // 2, 2)  # (N, K/2, 2): codes 2j, 2j+1
        return (pairs[..., 0] | pairs[..., 1] << 4).contiguous()
    return pack_bits(u, bits)


def _matmul(fn_name: str, x: Tensor, codes_n: Tensor, scale: Tensor, zero: Tensor | None, zc: float,
            group: int) -> Tensor:  # fmt: skip
    """``x (M, K) float32 -> (M, N) float32`` through the library's ``fn_name``."""
    x = x.contiguous()
    if not (codes_n.is_contiguous() and scale.is_contiguous() and (zero is None or zero.is_contiguous())):
        raise RuntimeError("native kernel: the layout tensors must be contiguous")  # the first-use guard falls back
    m, k = x.shape
    n = codes_n.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    fn = getattr(native().lib, fn_name)
    fn(codes_n.data_ptr(), scale.data_ptr(), zero.data_ptr() if zero is not None else None, zc,
       x.data_ptr(), y.data_ptr(), m, n, k, group, torch.get_num_threads())  # fmt: skip
    return y


# Code layouts slimlm_dequant reads (dequant.c)
LAYOUT_BLOCK4, LAYOUT_PAIRS4, LAYOUT_U8, LAYOUT_S8 = range(4)


def dequantize(codes: Tensor, layout: int, scale: Tensor, zero: Tensor | None, zc: float,
               shape: tuple[int, int], out: Tensor | None = None) -> Tensor | None:  # fmt: skip
    """``(u - z) * s`` float32 ``(N, K)`` from ``codes`` in ``layout`` (one scale/zero per group, ``(N, K / G)``),
    equal bit for bit to the same float32 expression in torch, written into ``out`` when given (contiguous
    float32 ``(N, K)``); None where the library cannot (not loaded, not on the CPU, inside a compiled graph):
    the caller's torch form runs."""
    lib = native().lib
    if lib is None or codes.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    n, k = shape
    scale = scale.float().contiguous()
    zero = None if zero is None else zero.float().contiguous()
    if scale.shape[0] != n or k % scale.shape[1] or not codes.is_contiguous():
        return None
    if out is None:
        out = torch.empty((n, k), dtype=torch.float32)
    lib.slimlm_dequant(codes.data_ptr(), scale.data_ptr(), zero.data_ptr() if zero is not None else None, zc,
                       out.data_ptr(), n, k, k // scale.shape[1], layout, torch.get_num_threads())  # fmt: skip
    return out


@torch.library.custom_op("slimlm::native_q4_mm", mutates_args=())
def q4_mm_op(x: Tensor, codes_n: Tensor, scale: Tensor, zero: Optional[Tensor], zc: float, group: int) -> Tensor:
    return _matmul("slimlm_q4_matmul", x, codes_n, scale, zero, zc, group)


@torch.library.custom_op("slimlm::native_q8_mm", mutates_args=())
def q8_mm_op(x: Tensor, codes_n: Tensor, scale: Tensor, zero: Optional[Tensor], zc: float, group: int) -> Tensor:
    return _matmul("slimlm_q8_matmul", x, codes_n, scale, zero, zc, group)


@q4_mm_op.register_fake
def _q4_fake(x: Tensor, codes_n: Tensor, scale: Tensor, zero: Optional[Tensor], zc: float, group: int) -> Tensor:
    return x.new_empty((x.shape[0], codes_n.shape[0]), dtype=torch.float32)


@q8_mm_op.register_fake
def _q8_fake(x: Tensor, codes_n: Tensor, scale: Tensor, zero: Optional[Tensor], zc: float, group: int) -> Tensor:
    return x.new_empty((x.shape[0], codes_n.shape[0]), dtype=torch.float32)


def native_mm(bits: int, x: Tensor, codes_n: Tensor, scale: Tensor, zero: Tensor | None, zc: float,
              group: int) -> Tensor:  # fmt: skip
    """``x (M, K) float32 @ W^T -> (M, N) float32``; through the registered op while compiling."""
    if torch.compiler.is_compiling():
        op = torch.ops.slimlm.native_q8_mm if bits == 8 else torch.ops.slimlm.native_q4_mm
        return op(x, codes_n, scale, zero, zc, group)
    return _matmul("slimlm_q8_matmul" if bits == 8 else "slimlm_q4_matmul", x, codes_n, scale, zero, zc, group)
