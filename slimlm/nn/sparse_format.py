"""The stored form of a pruned weight: kept values plus where they sit.

A pruned ``W (out, in)`` with keep-mask ``K`` is stored as its kept values
``W[K]`` (row-major order: row by row, columns ascending) and one of two
position layouts:

==========  ===========================================================  ==================
layout      tensor                                                       bits per weight
==========  ===========================================================  ==================
bitmask     ``mask`` uint8 ``(out, ceil(in / 8))``: bit ``j % 8`` of         1
            byte ``j // 8`` of row ``r`` is ``K[r, j]`` (pack_bits, 1 bit)
N:M index   ``index`` uint8 ``(out, ceil(in*n/m * b / 8))``: for each kept  ``n * b / m``
            weight its position ``0..m-1`` in its group of ``m``,
            ``b = ceil(log2 m)`` bits (pack_bits, b bits)
==========  ===========================================================  ==================

N:M uses the index layout when it is no larger than the bitmask
(``n * b <= m``: 2:4 takes 1 bit per weight, the layout of NVIDIA's 2:4
metadata; 1:4 takes 0.5), else the bitmask (4:8 would take 1.5 bits as
indices, 1 as a mask). ``pattern`` int16 ``(2,)`` holds ``(n, m)``, or
``(0, 0)`` for unstructured. Decoding validates counts, so a damaged
checkpoint is refused instead of loaded wrong.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats.packing import pack_bits, packed_length, unpack_bits

Tensors = dict[str, Tensor]
NMPair = tuple[int, int] | None


def index_bits(m: int) -> int:
    """Bits of one position inside a group of ``m``: ``ceil(log2 m)`` (at least 1)."""
    return max(1, math.ceil(math.log2(m)))


def uses_index(nm: NMPair) -> bool:
    """Whether an N:M pattern is stored as per-weight positions (smaller than, or as small as, a bitmask)."""
    return nm is not None and nm[0] * index_bits(nm[1]) <= nm[1]


def pattern_tensor(nm: NMPair, device: torch.device | str | None = None) -> Tensor:
    return torch.tensor(nm or (0, 0), dtype=torch.int16, device=device)


def pattern_of(t: Tensors) -> NMPair:
    if t["pattern"].shape != (2,) or t["pattern"].is_floating_point():
        raise SlimlmError(f"sparse pattern has shape {tuple(t['pattern'].shape)}, not (2,) ints; the checkpoint "
                          "is damaged")  # fmt: skip
    n, m = (int(v) for v in t["pattern"].tolist())
    if (n, m) != (0, 0) and not 0 < n <= m:
        raise SlimlmError(f"sparse pattern {n}:{m} keeps no valid N of M; the checkpoint is damaged")
    return None if (n, m) == (0, 0) else (n, m)


@torch.no_grad()
def encode_positions(keep: Tensor, nm: NMPair) -> Tensors:
    """``{"mask"|"index": ..., "pattern": ...}`` for a keep-mask ``(out, in)`` (N:M checked exactly)."""
    out_f, in_f = keep.shape
    t = {"pattern": pattern_tensor(nm, keep.device)}
    if nm is not None:
        n, m = nm
        if in_f % m or not bool((keep.reshape(out_f, in_f // m, m).sum(-1) == n).all()):
            raise SlimlmError(f"the mask does not keep exactly {n} of every {m} columns; cannot store it as {n}:{m}")
    if not uses_index(nm):
        t["mask"] = pack_bits(keep.to(torch.uint8), 1)
        return t
    n, m = nm
    groups = keep.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    pos = torch.arange(m, device=keep.device).expand_as(groups)[groups]  # (out * in/m * n,) ascending per group
    t["index"] = pack_bits(pos.reshape(out_f, in_f // m * n), index_bits(m))  # (out, in/m * n) codes
    return t


@torch.no_grad()
def decode_positions(t: Tensors, shape: tuple[int, int]) -> Tensor:
    """The keep-mask ``(out, in)`` bool of :func:`encode_positions`' tensors."""
    out_f, in_f = shape
    nm = pattern_of(t)
    if "mask" in t:
        if t["mask"].shape != (out_f, packed_length(in_f, 1)):
            raise SlimlmError(f"sparse mask has shape {tuple(t['mask'].shape)}; a {out_f}x{in_f} weight "
                              f"needs ({out_f}, {packed_length(in_f, 1)})")  # fmt: skip
        keep = unpack_bits(t["mask"], 1, in_f).bool()
        if nm is not None and not bool((keep.reshape(out_f, in_f // nm[1], nm[1]).sum(-1) == nm[0]).all()):
            raise SlimlmError(f"sparse mask breaks its {nm[0]}:{nm[1]} pattern; the checkpoint is damaged")
        return keep
    if nm is None or in_f % nm[1]:
        raise SlimlmError(f"N:M index stored with pattern {nm} for in_features {in_f}; the checkpoint is damaged")
    n, m = nm
    kept = in_f // m * n
    if t["index"].shape != (out_f, packed_length(kept, index_bits(m))):
        raise SlimlmError(f"N:M index has shape {tuple(t['index'].shape)}; a {out_f}x{in_f} weight at {n}:{m} needs "
                          f"({out_f}, {packed_length(kept, index_bits(m))})")  # fmt: skip
    pos = unpack_bits(t["index"], index_bits(m), kept).long().reshape(out_f, in_f // m, n)  # (out, in/m, n)
    if bool((pos >= m).any()):
        raise SlimlmError(f"N:M index holds positions >= {m}; the checkpoint is damaged")
    keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool, device=pos.device).scatter_(-1, pos, True)
    if not bool((keep.sum(-1) == n).all()):
        raise SlimlmError(f"N:M index repeats a position within a group of {m}; the checkpoint is damaged")
    return keep.reshape(out_f, in_f)


def positions_nbytes(nm: NMPair, shape: tuple[int, int]) -> int:
    """Bytes the positions of a ``shape`` weight take (mask or index), without the pattern."""
    out_f, in_f = shape
    if not uses_index(nm):
        return out_f * packed_length(in_f, 1)
    return out_f * packed_length(in_f // nm[1] * nm[0], index_bits(nm[1]))
