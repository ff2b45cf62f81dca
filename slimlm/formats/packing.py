"""Exact bit packing of integer codes along the last dimension.

Layout (one spec for every width 1..8): the codes of a row form one
little-endian bit stream, code ``i`` occupying bits ``[i*b, (i+1)*b)``,
cut into bytes of 8 bits (bit 0 is the least significant). A row of ``n``
codes takes exactly ``ceil(n * b / 8)`` bytes, the tail padded with zero
bits. So 4-bit puts code ``2k`` in the low nibble of byte ``k``, 2-bit puts
4 codes in a byte, and 3-bit puts 8 codes in 3 bytes.

Ternary codes may instead use base-3 packing: 5 trits per byte
(``3^5 = 243 <= 256``), 1.6 bits per weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

TRITS_PER_BYTE = 5


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SlimlmError(f"pack bits must be one of 1, 2, 3, 4, 5, 6, 7, 8, got {bits!r}")


def _check_range(codes: Tensor, low: int, high: int, what: str) -> None:
    # Meta tensors carry shapes only (bits_per_weight packs them to count bytes).
    if codes.is_meta or codes.numel() == 0:
        return
    if codes.is_floating_point() or codes.is_complex():
        raise SlimlmError(f"{what} must be an integer tensor, got {codes.dtype}")
    cmin, cmax = int(codes.min()), int(codes.max())
    if cmin < low or cmax > high:
        raise SlimlmError(f"{what} must lie in [{low}, {high}], found values in [{cmin}, {cmax}]")


def _block(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` per whole block: the smallest run that ends on a byte."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    return (n * bits + 7) // 8


@torch.no_grad()
def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes in ``[0, 2^bits)`` along the last dim into uint8.

    ``codes (..., n)`` -> ``(..., ceil(n * bits / 8))`` uint8.
    """
    _check_bits(bits)
    _check_range(codes, 0, 2**bits - 1, f"{bits}-bit codes")
    per, nbytes = _block(bits)
    n = codes.shape[-1]
    blocks = -(-n // per)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, blocks * per - n))
    c = c.reshape(*codes.shape[:-1], blocks, per)  # (..., blocks, per)
    # A block holds per * bits <= 56 bits: one int64 word per block.
    word = torch.zeros(c.shape[:-1], dtype=torch.int64, device=codes.device)  # (..., blocks)
    for k in range(per):
        word |= c[..., k] << (bits * k)
    shifts = torch.arange(0, 8 * nbytes, 8, dtype=torch.int64, device=codes.device)  # (nbytes,)
    out = (word.unsqueeze(-1) >> shifts) & 0xFF  # (..., blocks, nbytes)
    out = out.reshape(*codes.shape[:-1], blocks * nbytes)
    return out[..., : packed_length(n, bits)].to(torch.uint8)


@torch.no_grad()
def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``(..., ceil(n*bits/8))`` uint8 -> ``(..., n)`` uint8."""
    _check_bits(bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise SlimlmError(
            f"{n} codes of {bits} bits need {packed_length(n, bits)} bytes, got {packed.shape[-1]}"
        )
    per, nbytes = _block(bits)
    if nbytes == 1:  # 1, 2, 4, 8 bits: whole codes per byte, shift bytes directly (the hot path)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
        out = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., bytes, per)
        return out.reshape(*packed.shape[:-1], -1)[..., :n]
    # Otherwise assemble each block's bytes into one word: int32 holds 3- and 6-bit blocks (24 bits).
    wide = torch.int32 if 8 * nbytes <= 31 else torch.int64
    blocks = -(-n // per)
    p = torch.nn.functional.pad(packed.to(wide), (0, blocks * nbytes - packed.shape[-1]))
    p = p.reshape(*packed.shape[:-1], blocks, nbytes)  # (..., blocks, nbytes)
    word = torch.zeros(p.shape[:-1], dtype=wide, device=packed.device)  # (..., blocks)
    for j in range(nbytes):
        word |= p[..., j] << (8 * j)
    shifts = torch.arange(0, bits * per, bits, dtype=wide, device=packed.device)  # (per,)
    out = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., blocks, per)
    out = out.reshape(*packed.shape[:-1], blocks * per)
    return out[..., :n].to(torch.uint8)


@torch.no_grad()
def pack_trits(codes: Tensor) -> Tensor:
    """Pack ternary codes in ``{-1, 0, 1}`` 5 per byte (base 3), along the last dim.

    ``codes (..., n)`` -> ``(..., ceil(n / 5))`` uint8; trit ``k`` of a byte
    is digit ``k`` (least significant first) of its value in base 3.
    """
    _check_range(codes, -1, 1, "ternary codes")
    n = codes.shape[-1]
    blocks = -(-n // TRITS_PER_BYTE)
    t = torch.nn.functional.pad(codes.to(torch.int64) + 1, (0, blocks * TRITS_PER_BYTE - n))
    t = t.reshape(*codes.shape[:-1], blocks, TRITS_PER_BYTE)  # (..., blocks, 5) digits 0..2
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int64, device=codes.device)  # (5,)
    return (t * powers).sum(dim=-1).to(torch.uint8)  # (..., blocks), values <= 242


@torch.no_grad()
def unpack_trits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_trits`: ``(..., ceil(n/5))`` uint8 -> ``(..., n)`` int8 in {-1, 0, 1}."""
    if packed.shape[-1] != -(-n // TRITS_PER_BYTE):
        raise SlimlmError(f"{n} trits need {-(-n // TRITS_PER_BYTE)} bytes, got {packed.shape[-1]}")
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int64, device=packed.device)  # (5,)
    digits = (packed.to(torch.int64).unsqueeze(-1) // powers) % 3  # (..., blocks, 5)
    digits = digits.reshape(*packed.shape[:-1], -1)[..., :n]
    return (digits - 1).to(torch.int8)
