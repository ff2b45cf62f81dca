"""Rows of a packed weight: the stored tensors of output rows ``ids`` alone, for a table lookup.

A quantized output projection ``W (V, d)`` doubles as an embedding table when
its rows can be read one token at a time. Every scheme here keeps what a row
needs in that row of each stored tensor (:mod:`slimlm.formats.codec`): codes
packed along rows, and scales, zeros or a codebook either one per row (or per
group of a row) or one for the whole tensor. So the rows ``ids`` of the
weight are ``dequantize(unpack(rows_of(packed, ...)))``, and since every
dequantization is elementwise per row they equal ``dequantize(unpack(packed))
[ids]`` bit for bit.

NF4 is the exception: its absmax blocks run over the flattened weight and its
double quantization chunks 256 blocks, so a row's scale is not a row of any
tensor; :func:`rows_refusal` says so.
"""

from __future__ import annotations

from torch import Tensor

from slimlm.formats.granularity import PerTensor
from slimlm.formats.scheme import BinaryScheme, IntScheme, KMeansScheme, Scheme, TernaryScheme

Tensors = dict[str, Tensor]


def _per_row_keys(scheme: Scheme) -> tuple[str, ...] | None:
    """The stored tensors with one leading row per output row (the rest hold the whole tensor), or None."""
    if isinstance(scheme, IntScheme):
        return ("codes",) if isinstance(scheme.granularity, PerTensor) else ("codes", "scale", "zero")
    if isinstance(scheme, KMeansScheme):
        return ("codes", "codebook") if scheme.per_row else ("codes",)
    if isinstance(scheme, (TernaryScheme, BinaryScheme)):
        return ("codes", "scale")
    return None


def rows_refusal(scheme: Scheme) -> str | None:
    """Why the rows of a weight in ``scheme`` cannot be read alone, or None when they can."""
    if _per_row_keys(scheme) is None:
        return (f"{type(scheme).__name__} keeps no per-row scales (its blocks run across rows); use an int "
                "scheme such as int8-channel-sym or int4-g64")  # fmt: skip
    return None


def rows_of(packed: Tensors, scheme: Scheme, ids: Tensor) -> Tensors:
    """The stored tensors of rows ``ids`` (1-D int64): ``codec.unpack`` them with shape ``(len(ids), in)``."""
    keys = _per_row_keys(scheme)
    if keys is None:
        raise ValueError(rows_refusal(scheme))
    return {k: t.index_select(0, ids) if k in keys else t for k, t in packed.items()}
