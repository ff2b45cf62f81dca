"""Realise each scheme: quantize, dequantize, pack, unpack, bits per weight.

One explicit registry, :data:`CODECS`, maps a scheme type to its four
functions. ``pack`` returns exactly what a checkpoint stores (a dict of
tensors); ``bits_per_weight`` is computed from the sizes of those packed
tensors, so the number reported cannot drift from the bytes written.

Stored tensors per scheme (``n = in_features``; codes packed along rows):

==========  ==============================================================
int         codes uint8 (out, ceil(n*b/8)) [symmetric codes offset by
            2^(b-1)], scale fp16 (R, g), zero fp16 (R, g) if asymmetric
nf4         codes uint8 (out, ceil(n/2)), absmax fp32 (n_blocks,) or
            absmax_codes int8 (n_blocks,), absmax_scale fp32
            (ceil(n_blocks/256),), absmax_offset fp32 (1,)
kmeans      codes uint8 (out, ceil(n*b/8)), codebook fp16 (out or 1, 2^b)
ternary     codes uint8 (out, ceil(n/5)) base 3, or (out, ceil(n/4))
            2-bit of code + 1; scale fp16 (out, 1)
binary      codes uint8 (out, ceil(n/8)) with bit 1 for +1; scale fp16 (out, 1)
==========  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats import binary, kmeans, nf4, ternary
from slimlm.formats.affine import affine_dequantize, affine_params, affine_quantize
from slimlm.formats.packing import pack_bits, pack_trits, unpack_bits, unpack_trits
from slimlm.formats.scheme import (
    BinaryScheme,
    DoubleQuant,
    IntScheme,
    KMeansScheme,
    NF4Scheme,
    QuantizedWeight,
    Scheme,
    TernaryScheme,
)

Tensors = dict[str, Tensor]


def _stored(t: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Cast to the storage dtype, refusing a value the cast would change."""
    s = t.to(dtype)
    if not t.is_meta and not torch.equal(s.float(), t.float()):
        raise SlimlmError(f"{name} is not exactly representable in {dtype}; compute it with slimlm.formats")
    return s


def _check_2d(W: Tensor) -> tuple[int, int]:
    if W.dim() != 2:
        raise SlimlmError(f"weights must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")
    return tuple(W.shape)


# --- int ------------------------------------------------------------------


def _int_quantize(W: Tensor, s: IntScheme) -> QuantizedWeight:
    shape = _check_2d(W)
    scale, zero = affine_params(
        W, bits=s.bits, symmetric=s.symmetric, granularity=s.granularity, clip_search=s.clip_search
    )
    codes = affine_quantize(W, scale, zero, bits=s.bits, symmetric=s.symmetric)
    return QuantizedWeight(s, shape, codes, scale=scale, zero=None if s.symmetric else zero)


def _int_dequantize(qw: QuantizedWeight) -> Tensor:
    return affine_dequantize(qw.codes, qw.scale, qw.zero)


def _int_pack(qw: QuantizedWeight) -> Tensors:
    s: IntScheme = qw.scheme
    offset = 2 ** (s.bits - 1) if s.symmetric else 0  # signed [-(2^(b-1)-1), ..] -> [1, 2^b - 1]
    out = {
        "codes": pack_bits(qw.codes.to(torch.int16) + offset, s.bits),
        "scale": _stored(qw.scale, torch.float16, "scale"),
    }
    if not s.symmetric:
        out["zero"] = _stored(qw.zero, torch.float16, "zero")
    return out


def _int_unpack(t: Tensors, s: IntScheme, shape: tuple[int, int]) -> QuantizedWeight:
    offset = 2 ** (s.bits - 1) if s.symmetric else 0
    codes = unpack_bits(t["codes"], s.bits, shape[1]).to(torch.int16) - offset
    codes = codes.to(torch.int8 if s.symmetric else torch.uint8)
    zero = None if s.symmetric else t["zero"].float()
    return QuantizedWeight(s, shape, codes, scale=t["scale"].float(), zero=zero)


# --- nf4 ------------------------------------------------------------------


def _nf4_quantize(W: Tensor, s: NF4Scheme) -> QuantizedWeight:
    shape = _check_2d(W)
    absmax = nf4.nf4_absmax(W, s.block_size)
    if not s.double_quant:
        return QuantizedWeight(s, shape, nf4.nf4_quantize(W, absmax, s.block_size), scale=absmax)
    dq = DoubleQuant(*nf4.double_quantize(absmax))
    absmax_hat = nf4.double_dequantize(dq.codes, dq.scale, dq.offset)  # code against what is stored
    return QuantizedWeight(s, shape, nf4.nf4_quantize(W, absmax_hat, s.block_size), dq=dq)


def _nf4_absmax(qw: QuantizedWeight) -> Tensor:
    if qw.dq is None:
        return qw.scale
    return nf4.double_dequantize(qw.dq.codes, qw.dq.scale, qw.dq.offset)


def _nf4_dequantize(qw: QuantizedWeight) -> Tensor:
    return nf4.nf4_dequantize(qw.codes, _nf4_absmax(qw), qw.scheme.block_size)


def _nf4_pack(qw: QuantizedWeight) -> Tensors:
    out = {"codes": pack_bits(qw.codes, 4)}
    if qw.dq is None:
        out["absmax"] = _stored(qw.scale, torch.float32, "absmax")
    else:
        out["absmax_codes"] = qw.dq.codes.to(torch.int8)
        out["absmax_scale"] = _stored(qw.dq.scale, torch.float32, "absmax_scale")
        out["absmax_offset"] = _stored(qw.dq.offset, torch.float32, "absmax_offset")
    return out


def _nf4_unpack(t: Tensors, s: NF4Scheme, shape: tuple[int, int]) -> QuantizedWeight:
    codes = unpack_bits(t["codes"], 4, shape[1])
    if not s.double_quant:
        return QuantizedWeight(s, shape, codes, scale=t["absmax"].float())
    dq = DoubleQuant(t["absmax_codes"], t["absmax_scale"].float(), t["absmax_offset"].float())
    return QuantizedWeight(s, shape, codes, dq=dq)


# --- k-means --------------------------------------------------------------


def _kmeans_quantize(W: Tensor, s: KMeansScheme) -> QuantizedWeight:
    shape = _check_2d(W)
    codebook = kmeans.kmeans_codebook(W, bits=s.bits, per_row=s.per_row, iters=s.iters, init=s.init)
    return QuantizedWeight(s, shape, kmeans.kmeans_quantize(W, codebook), codebook=codebook)


def _kmeans_dequantize(qw: QuantizedWeight) -> Tensor:
    return kmeans.kmeans_dequantize(qw.codes, qw.codebook)


def _kmeans_pack(qw: QuantizedWeight) -> Tensors:
    return {
        "codes": pack_bits(qw.codes, qw.scheme.bits),
        "codebook": _stored(qw.codebook, kmeans.CODEBOOK_DTYPE, "codebook"),
    }


def _kmeans_unpack(t: Tensors, s: KMeansScheme, shape: tuple[int, int]) -> QuantizedWeight:
    codes = unpack_bits(t["codes"], s.bits, shape[1])
    return QuantizedWeight(s, shape, codes, codebook=t["codebook"].float())


# --- ternary and binary ---------------------------------------------------


def _ternary_quantize(W: Tensor, s: TernaryScheme) -> QuantizedWeight:
    shape = _check_2d(W)
    codes, scale = ternary.ternary_quantize(W, threshold=s.threshold)
    return QuantizedWeight(s, shape, codes, scale=scale)


def _ternary_dequantize(qw: QuantizedWeight) -> Tensor:
    return ternary.ternary_dequantize(qw.codes, qw.scale)


def _ternary_pack(qw: QuantizedWeight) -> Tensors:
    codes = pack_trits(qw.codes) if qw.scheme.pack_base3 else pack_bits(qw.codes.to(torch.int16) + 1, 2)
    return {"codes": codes, "scale": _stored(qw.scale, ternary.SCALE_DTYPE, "scale")}


def _ternary_unpack(t: Tensors, s: TernaryScheme, shape: tuple[int, int]) -> QuantizedWeight:
    if s.pack_base3:
        codes = unpack_trits(t["codes"], shape[1])
    else:
        codes = (unpack_bits(t["codes"], 2, shape[1]).to(torch.int16) - 1).to(torch.int8)
    return QuantizedWeight(s, shape, codes, scale=t["scale"].float())


def _binary_quantize(W: Tensor, s: BinaryScheme) -> QuantizedWeight:
    shape = _check_2d(W)
    codes, scale = binary.binary_quantize(W)
    return QuantizedWeight(s, shape, codes, scale=scale)


def _binary_dequantize(qw: QuantizedWeight) -> Tensor:
    return binary.binary_dequantize(qw.codes, qw.scale)


def _binary_pack(qw: QuantizedWeight) -> Tensors:
    return {
        "codes": pack_bits((qw.codes > 0).to(torch.uint8), 1),
        "scale": _stored(qw.scale, binary.SCALE_DTYPE, "scale"),
    }


def _binary_unpack(t: Tensors, s: BinaryScheme, shape: tuple[int, int]) -> QuantizedWeight:
    bits = unpack_bits(t["codes"], 1, shape[1]).to(torch.int8)
    return QuantizedWeight(s, shape, bits * 2 - 1, scale=t["scale"].float())


# --- registry and public API ----------------------------------------------


@dataclass(frozen=True)
class Codec:
    quantize: Callable[[Tensor, Scheme], QuantizedWeight]
    dequantize: Callable[[QuantizedWeight], Tensor]
    pack: Callable[[QuantizedWeight], Tensors]
    unpack: Callable[[Tensors, Scheme, tuple[int, int]], QuantizedWeight]


CODECS: dict[type, Codec] = {
    IntScheme: Codec(_int_quantize, _int_dequantize, _int_pack, _int_unpack),
    NF4Scheme: Codec(_nf4_quantize, _nf4_dequantize, _nf4_pack, _nf4_unpack),
    KMeansScheme: Codec(_kmeans_quantize, _kmeans_dequantize, _kmeans_pack, _kmeans_unpack),
    TernaryScheme: Codec(_ternary_quantize, _ternary_dequantize, _ternary_pack, _ternary_unpack),
    BinaryScheme: Codec(_binary_quantize, _binary_dequantize, _binary_pack, _binary_unpack),
}


def _codec(scheme: Scheme) -> Codec:
    codec = CODECS.get(type(scheme))
    if codec is None:
        allowed = ", ".join(t.__name__ for t in CODECS)
        raise SlimlmError(f"unknown scheme {scheme!r}; valid: {allowed}")
    return codec


@torch.no_grad()
def quantize(W: Tensor, scheme: Scheme) -> QuantizedWeight:
    """Quantize a 2-D weight ``W (out, in)`` (any float dtype) in ``scheme``; tensors on ``W.device``."""
    return _codec(scheme).quantize(W, scheme)


@torch.no_grad()
def dequantize(qw: QuantizedWeight) -> Tensor:
    """The float32 weight ``(out, in)`` a :class:`QuantizedWeight` stands for."""
    return _codec(qw.scheme).dequantize(qw)


def fake_quantize(W: Tensor, scheme: Scheme) -> Tensor:
    """``dequantize(quantize(W, scheme))``: float32, shaped like ``W``."""
    return dequantize(quantize(W, scheme))


@torch.no_grad()
def pack(qw: QuantizedWeight) -> Tensors:
    """The tensors a checkpoint stores for ``qw`` (see the module table)."""
    return _codec(qw.scheme).pack(qw)


@torch.no_grad()
def unpack(tensors: Tensors, scheme: Scheme, shape: tuple[int, int]) -> QuantizedWeight:
    """Inverse of :func:`pack`: exact, ``dequantize(unpack(pack(qw)))`` equals ``dequantize(qw)``."""
    return _codec(scheme).unpack(tensors, scheme, tuple(shape))


def packed_bits(tensors: Tensors) -> int:
    """Total bits of a packed dict: ``sum(numel * element_size * 8)``."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())


def bits_per_weight(scheme: Scheme, shape: tuple[int, int]) -> float:
    """Stored bits per weight of a ``shape`` weight in ``scheme``: codes, scales, zeros, codebooks.

    Computed by packing a shape-only (meta) weight, so it is the size of
    what :func:`pack` writes, not a formula kept beside it.
    """
    qw = quantize(torch.zeros(tuple(shape), device="meta"), scheme)
    return packed_bits(pack(qw)) / (shape[0] * shape[1])
