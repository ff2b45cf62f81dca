"""slimlm's stored integer weights as compressed-tensors tensors, code for code.

compressed-tensors (checked against 0.20.1) stores an int weight ``W ≈ (q - z) * s`` with
*signed* codes ``q`` and zero points ``z`` in ``[-2^(b-1), 2^(b-1) - 1]``:

* ``pack-quantized`` (weight-only, any 1..8 bits): ``weight_packed`` int32 ``(out, ceil(in*b/32))``
  holding ``q + 2^(b-1)``; code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's
  stream of int32 words (bit 0 of word 0 first). ``weight_scale`` ``(out, groups)``,
  ``weight_shape`` int64 ``[out, in]``, and when asymmetric ``weight_zero_point`` packed the same
  way along the *output* dimension: int32 ``(ceil(out*b/32), groups)`` holding ``z + 2^(b-1)``.
* ``int-quantized`` (W8A8): ``weight`` int8 ``(out, in)`` holding ``q``, ``weight_scale`` ``(out, 1)``.

slimlm stores symmetric codes ``c`` in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (zero point 0) and
asymmetric codes ``u`` and integer zero points ``z_u`` in ``[0, 2^b - 1]``. The maps are exact:
symmetric ``q = c``; asymmetric ``q = u - 2^(b-1)``, ``z = z_u - 2^(b-1)``, so
``q - z = u - z_u`` and both stored fields are simply ``u`` and ``z_u``. That stream is slimlm's
own bit-packing (:func:`slimlm.formats.packing.pack_bits`, little-endian bits in bytes) read
four bytes at a time as little-endian int32 words, which is how it is built here.

Widths that do not divide 32 (3, 5, 6, 7 bits) use this dense layout since the version checked;
older compressed-tensors and vLLM releases padded each word instead (``32 // b`` codes per
word), so those files need a current reader. 2, 4 and 8 bits are laid out alike by every version.

Scales: slimlm's are float16 values; they are written as float32 (exact) unless the caller asks
for float16, so dequantizing ``(q - z) * s`` in the scale's dtype gives slimlm's float32 weight
bit for bit (an integer below 2^8 times an 11-bit mantissa fits float32's 24 bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats.granularity import PerTensor
from slimlm.formats.packing import pack_bits
from slimlm.formats.scheme import IntScheme, QuantizedWeight

SCALE_DTYPES = (torch.float32, torch.float16)


def pack_int32(stored: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``(rows, n)`` in ``[0, 2^bits)`` -> int32 words ``(rows, ceil(n*bits/32))``.

    Word ``k`` of a row holds bytes ``4k .. 4k+3`` of the row's bit stream, byte ``4k`` least
    significant; assembled with shifts, so the result does not depend on the host's byte order.
    """
    rows, n = stored.shape
    words = -(-n * bits // 32)
    packed = pack_bits(stored, bits)  # (rows, ceil(n*bits/8)) uint8
    packed = torch.nn.functional.pad(packed, (0, 4 * words - packed.shape[1]))  # (rows, 4 * words)
    b = packed.to(torch.int64).reshape(rows, words, 4)  # (rows, words, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # (rows, words) in [0, 2^32)
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement: the same 32 bits as int32
    return word.to(torch.int32)


def _stored_codes(qw: QuantizedWeight) -> Tensor:
    """slimlm's codes as compressed-tensors' stored unsigned values ``q + 2^(b-1)`` (see module doc)."""
    s: IntScheme = qw.scheme
    offset = 2 ** (s.bits - 1) if s.symmetric else 0
    return qw.codes.to(torch.int16) + offset  # (out, in) in [0, 2^b)


def _per_row(t: Tensor, out_features: int) -> Tensor:
    """A per-tensor ``(1, 1)`` parameter repeated per row ``(out, 1)``: the same dequantization as channel."""
    return t.expand(out_features, 1).contiguous()


def _zero_points(qw: QuantizedWeight, out_features: int) -> Tensor:
    """slimlm's zero points ``(R, g)``, refused unless integers in ``[0, 2^b)``, per row ``(out, g)``."""
    s: IntScheme = qw.scheme
    z = qw.zero if not isinstance(s.granularity, PerTensor) else _per_row(qw.zero, out_features)
    if not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > 2**s.bits - 1:
        raise SlimlmError(f"zero points of an int{s.bits} weight must be integers in [0, {2**s.bits - 1}] to be "
                          "written code for code; this checkpoint's are not: quantize again with slimlm")  # fmt: skip
    return z.to(torch.int16)


def pack_quantized_tensors(qw: QuantizedWeight, *, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """compressed-tensors ``pack-quantized`` tensors of an int weight (keys without the module prefix).

    Per-tensor parameters go out repeated per row (channel strategy): the same weight, and the
    layout inference engines run (vLLM's weight-only kernels take group or channel scales)."""
    s = qw.scheme
    if not isinstance(s, IntScheme):
        raise SlimlmError(f"pack-quantized holds int weights, got {s!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise SlimlmError(f"scale dtype must be one of {', '.join(map(str, SCALE_DTYPES))}, got {scale_dtype}")
    out_features, in_features = qw.shape
    scale = qw.scale if not isinstance(s.granularity, PerTensor) else _per_row(qw.scale, out_features)
    tensors = {
        "weight_packed": pack_int32(_stored_codes(qw), s.bits),  # (out, ceil(in*b/32))
        "weight_scale": scale.to(scale_dtype),  # (out, groups); fp16 values, exact in either dtype
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not s.symmetric:
        z = _zero_points(qw, out_features)  # (out, groups) stored values z_u = z + 2^(b-1)
        tensors["weight_zero_point"] = pack_int32(z.t(), s.bits).t().contiguous()  # (ceil(out*b/32), groups)
    return tensors


def int_quantized_tensors(qw: QuantizedWeight, *, scale_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """compressed-tensors ``int-quantized`` tensors of a symmetric int8 per-channel weight (W8A8)."""
    s = qw.scheme
    if not (isinstance(s, IntScheme) and s.bits == 8 and s.symmetric) or qw.scale.shape != (qw.shape[0], 1):
        raise SlimlmError(f"int-quantized export takes symmetric int8 per-channel weights, got {s!r}")
    return {"weight": qw.codes.to(torch.int8), "weight_scale": qw.scale.to(scale_dtype)}  # (out, in), (out, 1)
