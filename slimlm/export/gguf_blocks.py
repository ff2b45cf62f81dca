"""GGUF's legacy block formats, built from slimlm's integer codes and scales (no re-rounding).

ggml's legacy types cut every row into blocks of 32 consecutive weights along the input
dimension; each block stores a float16 scale ``d`` (and a float16 minimum ``m`` for the
``_1`` types) and its codes. All multi-byte fields are little-endian:

======  =====  ==============================================  =========================  =====
type    bytes  block layout                                    weight j                   bpw
======  =====  ==============================================  =========================  =====
Q8_0    34     d, int8 q[32]                                   d * q[j]                   8.5
Q4_0    18     d, qs[16] = q[j] | q[j+16] << 4                 d * (q[j] - 8), q 0..15    4.5
Q4_1    20     d, m, qs[16]                                    d * q[j] + m               5.0
Q5_0    22     d, qh (u32: bit j = bit 4 of q[j]), qs[16]      d * (q[j] - 16), q 0..31   5.5
Q5_1    24     d, m, qh, qs[16] (qs holds the low 4 bits)      d * q[j] + m               6.0
======  =====  ==============================================  =========================  =====

How slimlm's int codes (:mod:`slimlm.formats.affine`) land on them:

* symmetric b-bit codes ``c`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with scale ``s`` (``w = s*c``):
  Q8_0 stores ``q = c``, Q4_0 ``q = c + 8`` (in 1..15), Q5_0 ``q = c + 16`` (in 1..31), ``d = s``.
  ``d * (q - 8)`` is then the same float32 product as slimlm's ``(c - 0) * s``: bit-exact.
* asymmetric b-bit codes ``c`` in ``[0, 2^b - 1]``, integer zero point ``z``, scale ``s``
  (``w = (c - z) * s = s*c - s*z``): Q4_1/Q5_1 with ``q = c``, ``d = s`` and ``m = fp16(-s*z)``.
  ``s*z`` is exact in float32 (an 11-bit significand times an integer below 32), so the one
  rounding is ``m``'s to float16, at most half a float16 ulp: ``|m + s*z| <= 2^-11 * s*z``,
  i.e. at most ``(2^b - 1) * 2^-11`` of a step ``s`` (0.74% for 4 bits, 1.5% for 5 bits), and
  ``2^-25`` absolute where ``s*z`` falls below float16's normal range. The reader's ``d*q + m``
  adds one float32 rounding of its own.
* A slimlm group of ``G = 32k`` columns (or a whole row, or the whole tensor) becomes ``k``
  blocks that repeat its scale and zero: still exact, one more float16 per 32 weights.

Anything else (other bit widths, 8-bit asymmetric, groups not a multiple of 32) has no GGUF
legacy type that holds it code for code; :func:`exact_type` says which, or why not.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import Tensor

from slimlm.formats.granularity import PerChannel, PerGroup, PerTensor
from slimlm.formats.scheme import IntScheme, QuantizedWeight, Scheme

BLOCK = 32  # weights per block in every legacy type
# (bits, symmetric) -> the GGUF type holding that int grid, and the offset added to slimlm's code
EXACT_TYPES: dict[tuple[int, bool], tuple[QT, int]] = {
    (8, True): (QT.Q8_0, 0),
    (4, True): (QT.Q4_0, 8),
    (5, True): (QT.Q5_0, 16),
    (4, False): (QT.Q4_1, 0),
    (5, False): (QT.Q5_1, 0),
}


def _run_length(scheme: IntScheme, shape: tuple[int, int]) -> int:
    """Consecutive input columns of a row that share one scale under ``scheme``."""
    g = scheme.granularity
    if isinstance(g, PerGroup):
        return g.size
    if isinstance(g, (PerChannel, PerTensor)):
        return shape[1]
    raise TypeError(f"not a weight granularity: {g!r}")


def exact_type(scheme: Scheme, shape: tuple[int, int]) -> tuple[QT | None, str]:
    """The GGUF type that holds ``scheme``'s codes exactly for a weight of ``shape``, or (None, why not)."""
    if not isinstance(scheme, IntScheme):
        return None, f"{type(scheme).__name__} is not a linear int grid"
    entry = EXACT_TYPES.get((scheme.bits, scheme.symmetric))
    if entry is None:
        kind = "symmetric" if scheme.symmetric else "asymmetric"
        return None, f"int{scheme.bits} {kind} has no GGUF legacy type (int4/int5 either, int8 symmetric)"
    run = _run_length(scheme, shape)
    if run % BLOCK or shape[1] % BLOCK:
        return None, f"scales shared by {run} columns of {shape[1]} do not cover whole GGUF blocks of {BLOCK}"
    return entry[0], ""


def _per_block(t: Tensor, out: int, n_in: int) -> Tensor:
    """A scale-shaped ``(R, g)`` tensor as one value per block ``(out, n_in // 32)``."""
    R, g = t.shape
    full = t.reshape(R, g, 1).expand(R, g, out * n_in // (R * g)).reshape(out, n_in)  # (out, in)
    return full[:, ::BLOCK]


def block_params(qw: QuantizedWeight) -> tuple[QT, Tensor, Tensor, Tensor | None]:
    """``(type, q (out, in) int16 GGUF codes, d (out, nb) float16, m (out, nb) float16 or None)``.

    ``qw`` must satisfy :func:`exact_type`; ``m = fp16(-d*z)`` for asymmetric grids (see the
    module docstring for its rounding bound).
    """
    qtype, why = exact_type(qw.scheme, qw.shape)
    if qtype is None:
        raise ValueError(why)
    out, n_in = qw.shape
    offset = EXACT_TYPES[(qw.scheme.bits, qw.scheme.symmetric)][1]
    lo, hi = (-(2 ** (qw.scheme.bits - 1) - 1), 2 ** (qw.scheme.bits - 1) - 1) if qw.scheme.symmetric \
        else (0, 2**qw.scheme.bits - 1)  # fmt: skip
    codes = qw.codes.to(torch.int16)
    if codes.min() < lo or codes.max() > hi:
        raise ValueError(f"codes outside [{lo}, {hi}] for {qw.scheme!r}")
    q = codes + offset  # (out, in): Q8_0 signed -127..127, the others unsigned
    scale = _per_block(qw.scale.float(), out, n_in)  # (out, nb)
    d = scale.to(torch.float16)
    if not torch.equal(d.float(), scale):
        raise ValueError("scales are not exact in float16")
    if qw.scheme.symmetric:
        return qtype, q, d, None
    m = (-(scale * _per_block(qw.zero.float(), out, n_in))).to(torch.float16)  # (out, nb)
    if not torch.isfinite(m).all():
        raise ValueError("scale * zero overflows float16")
    return qtype, q, d, m


def permute_heads(x: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's row order for q/k projections: in each head, rows ``i`` and ``D/2 + i`` become
    rows ``2i`` and ``2i + 1`` (interleaved rotary pairs instead of halves). Whole rows move, so
    codes, per-row and per-block parameters permute alike and 32-wide input blocks survive."""
    rows = x.shape[0]
    D = rows // n_heads
    return x.reshape(n_heads, 2, D // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)  # (H, D/2, 2, ...)


def pack_blocks(qtype: QT, q: Tensor, d: Tensor, m: Tensor | None) -> np.ndarray:
    """Serialise GGUF codes ``q (out, in)`` and block parameters ``(out, nb)`` as ``(out, nb * bytes)`` uint8."""
    out, n_in = q.shape
    nb = n_in // BLOCK
    qb = q.cpu().numpy().reshape(out * nb, BLOCK)  # (N, 32) int16, one row per block
    parts = [d.cpu().numpy().reshape(-1, 1).view(np.uint8)]  # (N, 2)
    if m is not None:
        parts.append(m.cpu().numpy().reshape(-1, 1).view(np.uint8))
    if qtype == QT.Q8_0:
        parts.append(qb.astype(np.int8).view(np.uint8))  # two's complement int8
    else:
        qb = qb.astype(np.uint8)
        low = qb & np.uint8(0x0F)
        if qtype in (QT.Q5_0, QT.Q5_1):
            high = (qb >> np.uint8(4)) & np.uint8(1)
            parts.append(np.packbits(high, axis=-1, bitorder="little"))  # (N, 4): u32 bit j = high[j]
        parts.append(low[:, : BLOCK // 2] | (low[:, BLOCK // 2 :] << np.uint8(4)))  # (N, 16)
    return np.concatenate(parts, axis=-1).reshape(out, -1)
