"""KV-cache quantization, KIVI style: keys per channel, values per token.

Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu. "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv:2402.02750).

Keys have a few outlier *channels* with large magnitudes that persist over
tokens, so each channel gets its own scale over a group of ``group``
consecutive tokens; values have no fixed outlier channels and mix across
channels in the attention output, so each *token* gets its own scale (over
``value_group`` channels, the whole head by default). Both are asymmetric:
``x ~= q * scale + mn`` with ``mn`` the group minimum, codes in ``[0, 2^b-1]``.
The range is *not* widened to contain 0 (unlike weight formats, cached
activations need no exact zero), which matters for key channels with a large
offset. ``scale`` and ``mn`` are stored in float16 and the codes are computed
against the stored values, so the measured error is the real one.

The most recent tokens stay in float in a residual window (KIVI's ``R``):
keys are quantized a block of ``residual`` tokens at a time (a multiple of
``group``) once the block is full, values one token at a time as it leaves
the last ``residual`` tokens. :class:`KIVI` is the config; the cache class
that applies it is in :mod:`slimlm.generation.kv.kivi`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats.affine import MIN_SCALE, SCALE_DTYPE, affine_quantize
from slimlm.formats.packing import pack_bits

KV_BITS = (2, 4, 8)


@dataclass(frozen=True)
class KIVI:
    """KV quantization: ``bits`` per element, key groups of ``group`` tokens, ``residual`` float tokens."""

    bits: int = 4
    group: int = 32
    residual: int = 128
    value_group: int | None = None  # channels per value scale; None = the whole head (per token)

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS or isinstance(self.bits, bool):
            raise SlimlmError(f"KV bits must be one of {', '.join(map(str, KV_BITS))}, got {self.bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise SlimlmError(f"KV group must be a positive int (tokens per key scale, e.g. 32), got {self.group!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < self.group:
            raise SlimlmError(f"KV residual must be an int >= group ({self.group}), got {self.residual!r}")
        if self.residual % self.group:
            raise SlimlmError(f"KV residual {self.residual} must be a multiple of group {self.group} "
                              f"(e.g. {self.group * max(1, self.residual // self.group)})")  # fmt: skip
        if self.value_group is not None and (isinstance(self.value_group, bool) or self.value_group < 1):
            raise SlimlmError(f"KV value_group must be a positive int or None (whole head), got {self.value_group!r}")

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse a value group that does not split the head dim; 4-bit needs an even head dim."""
        vg = self.value_group or head_dim
        if head_dim % vg:
            valid = ", ".join(str(d) for d in range(1, head_dim + 1) if head_dim % d == 0)
            raise SlimlmError(f"KV value_group {vg} does not divide head_dim {head_dim}; valid: {valid}")
        if (head_dim * self.bits) % 8:
            raise SlimlmError(f"{self.bits}-bit KV packing needs head_dim * bits divisible by 8, "
                              f"got head_dim {head_dim}")


@dataclass
class QuantizedKV:
    """Packed codes plus float16 ``scale`` and ``mn``; ``x ~= q * scale + mn`` (broadcast).

    Keys: ``codes (..., T/G, G, D*b/8)``, ``scale``/``mn`` ``(..., T/G, 1, D)``.
    Values: ``codes (..., T, D*b/8)``, ``scale``/``mn`` ``(..., T, D/Gv)``.

    Tokens run along dim -3 for keys (in groups) and dim -2 for values, for
    every field, so blocks append with :func:`cat_quantized`.
    """

    codes: Tensor  # uint8, packed along the last (channel) dim
    scale: Tensor  # float16
    mn: Tensor  # float16
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.mn))


def _params(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """float16-exact ``(scale, mn)`` (as float32) for ranges ``[lo, hi]``."""
    mn = lo.to(SCALE_DTYPE).float()
    scale = ((hi - mn) / (2**bits - 1)).to(SCALE_DTYPE).float().clamp(min=MIN_SCALE)
    return scale, mn


def _codes(x: Tensor, scale: Tensor, mn: Tensor, bits: int) -> Tensor:
    """``round((x - mn) / scale)`` clamped to ``[0, 2^b-1]`` by the affine spec (uint8, ``x``'s shape).

    ``scale``/``mn`` are ``x``'s shape with the last (group) axis 1.
    """
    xs = (x - mn).reshape(-1, 1, x.shape[-1])  # (R, 1, n): one scale per row
    s = scale.reshape(-1, 1)  # (R, 1)
    return affine_quantize(xs, s, None, bits=bits, symmetric=False).reshape(x.shape)


@torch.no_grad()
def quantize_keys(K: Tensor, *, bits: int, group: int) -> QuantizedKV:
    """Per-channel key quantization over groups of ``group`` tokens. ``K (..., T, D)``, ``T % group == 0``."""
    *lead, T, D = K.shape
    if T % group:
        raise SlimlmError(f"key block of {T} tokens is not a multiple of the key group {group}")
    Kg = K.float().reshape(*lead, T // group, group, D)  # (..., T/G, G, D)
    scale, mn = _params(Kg.amin(dim=-2, keepdim=True), Kg.amax(dim=-2, keepdim=True), bits)  # (..., T/G, 1, D)
    # Channel-major view so the shared axis (the G tokens) is last for the rounding spec.
    q = _codes(Kg.transpose(-1, -2), scale.transpose(-1, -2), mn.transpose(-1, -2), bits)  # (..., T/G, D, G)
    codes = pack_bits(q.transpose(-1, -2), bits)  # (..., T/G, G, D*b/8)
    return QuantizedKV(codes, scale.to(SCALE_DTYPE), mn.to(SCALE_DTYPE), bits)


@torch.no_grad()
def quantize_values(V: Tensor, *, bits: int, group: int | None = None) -> QuantizedKV:
    """Per-token value quantization over ``group`` channels (the whole head by default). ``V (..., T, D)``."""
    *lead, T, D = V.shape
    Gv = group or D
    Vg = V.float().reshape(*lead, T, D // Gv, Gv)  # (..., T, D/Gv, Gv)
    scale, mn = _params(Vg.amin(dim=-1, keepdim=True), Vg.amax(dim=-1, keepdim=True), bits)  # (..., T, D/Gv, 1)
    q = _codes(Vg, scale, mn, bits).reshape(*lead, T, D)  # (..., T, D)
    return QuantizedKV(pack_bits(q, bits), scale.squeeze(-1).to(SCALE_DTYPE), mn.squeeze(-1).to(SCALE_DTYPE), bits)


def unpack_codes(codes: Tensor, bits: int) -> Tensor:
    """Fast inverse of ``pack_bits`` for 2, 4 and 8 bits: ``(..., n*b/8)`` uint8 -> ``(..., n)`` uint8."""
    if bits == 8:
        return codes
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    q = (codes.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., n/per, per): code k*per + j in bits j*b
    return q.reshape(*codes.shape[:-1], codes.shape[-1] * per)


def dequantize_keys(q: QuantizedKV, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(..., T/G, G, D*b/8)`` codes -> keys ``(..., T, D)``."""
    codes = unpack_codes(q.codes, q.bits)  # (..., T/G, G, D)
    K = codes.to(dtype) * q.scale.to(dtype) + q.mn.to(dtype)  # (..., T/G, G, D)
    return K.flatten(-3, -2)  # (..., T, D)


def dequantize_values(q: QuantizedKV, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(..., T, D*b/8)`` codes -> values ``(..., T, D)``."""
    codes = unpack_codes(q.codes, q.bits)  # (..., T, D)
    *lead, T, D = codes.shape
    Gv = D // q.scale.shape[-1]
    scale, mn = q.scale.to(dtype).unsqueeze(-1), q.mn.to(dtype).unsqueeze(-1)  # (..., T, D/Gv, 1)
    V = codes.reshape(*lead, T, D // Gv, Gv).to(dtype) * scale + mn  # (..., T, D/Gv, Gv)
    return V.reshape(*lead, T, D)


def cat_quantized(a: QuantizedKV | None, b: QuantizedKV, dim: int) -> QuantizedKV:
    """Append ``b`` to ``a`` along the token (or token-group) axis ``dim`` (negative)."""
    if a is None:
        return b
    return QuantizedKV(
        torch.cat([a.codes, b.codes], dim), torch.cat([a.scale, b.scale], dim), torch.cat([a.mn, b.mn], dim), a.bits
    )


# ---------------------------------------------------------------- which version of a token a query sees


def key_quantized_below(i: Tensor | int, residual: int) -> Tensor | int:
    """Keys of tokens ``j < R * floor(i / R)`` are quantized when token ``i`` attends (blocks of ``R``)."""
    return (i // residual) * residual


def value_quantized_below(i: Tensor | int, residual: int) -> Tensor | int:
    """Values of tokens ``j < i - R`` are quantized when token ``i`` attends (the last ``R + 1`` stay float)."""
    return i - residual


def kivi_regions(a: int, b: int, residual: int) -> list[tuple[str, int, int]]:
    """The key ranges a forward of queries ``a..b`` attends over, one version each.

    ``(kind, lo, hi)``: tokens ``lo <= j < hi`` with quantized keys and values
    (``"qq"``), quantized keys and float values (``"qf"``) or float keys and
    values (``"ff"``). With a single query (``a == b``) the ranges are disjoint
    and cover ``0..a``; with several, each query sees each token in exactly one
    of them (``value_quantized_below <= key_quantized_below`` for every ``i``),
    so a mask from :func:`kivi_mask` makes the forward equal ``b - a + 1``
    one-token forwards.
    """
    R = residual
    regions = [
        ("qq", 0, max(0, value_quantized_below(b, R))),
        ("qf", max(0, value_quantized_below(a, R)), key_quantized_below(b, R)),
        ("ff", key_quantized_below(a, R), b + 1),
    ]
    return [(kind, lo, hi) for kind, lo, hi in regions if hi > lo]


def kivi_mask(regions: list[tuple[str, int, int]], q_tokens: Tensor, residual: int) -> Tensor:
    """(T,) query token indices -> (T, S) bool: which region slot each query attends to."""
    cols = []
    i = q_tokens[:, None]  # (T, 1)
    kq, vq = key_quantized_below(i, residual), value_quantized_below(i, residual)
    for kind, lo, hi in regions:
        j = torch.arange(lo, hi, device=q_tokens.device)[None]  # (1, n)
        if kind == "qq":
            cols.append(j < vq)
        elif kind == "qf":
            cols.append((j >= vq) & (j < kq))
        else:
            cols.append((j >= kq) & (j <= i))
    return torch.cat(cols, dim=1)  # (T, S)
