"""Linear (affine) integer formats of 2..8 bits: the round-to-nearest spec.

``W ≈ (q - z) * s`` with integer codes ``q`` and one scale ``s`` (and zero
``z``) per tensor, row or group (see :mod:`slimlm.formats.granularity`).

* **Symmetric** (absmax): signed codes in the *restricted* range
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, ``s = absmax / (2^(b-1) - 1)``, ``z = 0``.
  The range is restricted (no ``-2^(b-1)``) so that ``+absmax`` and
  ``-absmax`` are both exact and rounding is symmetric about zero; it costs
  one code level (int2 symmetric has the three levels ``{-s, 0, s}``).
* **Asymmetric** (zero point): unsigned codes in ``[0, 2^b - 1]``,
  ``s = (max - min) / (2^b - 1)`` and an *integer* zero point
  ``z = round(-min / s)`` as in GPTQ. The range is widened to contain 0
  (``min <= 0 <= max``) so that 0 is exactly representable: pruned weights
  stay exactly zero.

Scales are rounded to float16 here, at the source, because float16 is what
a checkpoint stores; the codes are then computed against the stored scale,
so ``pack``/``unpack`` is exact and the error measured is the real one.
Integer zero points (at most 255) are exact in float16 too.

Parameter computation (:func:`affine_params`) is separate from rounding
(:func:`affine_quantize`) so GPTQ can compute a group's scale from ``W`` once
and then round one column at a time against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats.granularity import Granularity, PerChannel, group_view

SCALE_DTYPE = torch.float16
# Smallest positive float16 (subnormal): a floor that keeps all-zero groups
# (scale 0) from dividing by zero; it is exact in float16.
MIN_SCALE = 2.0**-24
CLIP_FACTORS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


def check_bits(bits: int, *, low: int = 2, high: int = 8) -> None:
    """Refuse a bit width outside ``low..high``, naming the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        allowed = ", ".join(str(b) for b in range(low, high + 1))
        raise SlimlmError(f"bits must be one of {allowed}, got {bits!r}")


def affine_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer code range ``(qmin, qmax)`` of a ``bits``-bit format."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _params_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero for ranges ``[lo, hi]`` (``lo <= 0 <= hi``), float16-exact float32."""
    qmin, qmax = affine_qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.to(SCALE_DTYPE).float().clamp(min=MIN_SCALE)
    if symmetric:
        return scale, torch.zeros_like(scale)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


@torch.no_grad()
def affine_params(
    W: Tensor, *, bits: int, symmetric: bool, granularity: Granularity, clip_search: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ``W (out, in)`` for one granularity.

    Returns ``(scale, zero)``, both float32 of shape ``(R, g)``: ``(1, 1)``
    per tensor, ``(out, 1)`` per channel, ``(out, in // G)`` per group.
    ``zero`` is all zeros when ``symmetric``. With ``clip_search`` each
    row/group keeps the range shrink factor in :data:`CLIP_FACTORS` (1.0
    included, so never worse than absmax) that minimises its squared error.
    """
    Wg = group_view(W.float(), granularity)  # (R, g, n)
    lo = Wg.amin(dim=-1).clamp(max=0.0)  # (R, g)
    hi = Wg.amax(dim=-1).clamp(min=0.0)  # (R, g)
    if not clip_search:
        return _params_from_range(lo, hi, bits, symmetric)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = torch.empty_like(lo), torch.empty_like(lo)
    for factor in CLIP_FACTORS:
        scale, zero = _params_from_range(lo * factor, hi * factor, bits, symmetric)
        Wq = affine_dequantize(affine_quantize(Wg, scale, zero, bits=bits, symmetric=symmetric), scale, zero)
        err = (Wq - Wg).pow(2).sum(dim=-1)  # (R, g)
        better = err < best_err  # strict: ties keep the larger range, factor 1.0 first
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _view_like(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` viewed as ``(R, g, n)`` to match a scale ``(R, g)``."""
    if scale.dim() != 2:
        raise SlimlmError(f"scale must be 2-D (R, g), got shape {tuple(scale.shape)}")
    R, g = scale.shape
    return x.reshape(R, g, -1)  # (R, g, n)


@torch.no_grad()
def affine_quantize(W: Tensor, scale: Tensor, zero: Tensor | None, *, bits: int, symmetric: bool) -> Tensor:
    """Integer codes of ``W`` against given ``scale``/``zero`` of shape ``(R, g)``.

    ``W`` may be the full weight ``(out, in)`` or any slice whose size is a
    multiple of ``R * g`` laid out group-major (e.g. one column ``(out, 1)``
    with a per-row scale ``(out, 1)``). Returns codes of ``W``'s shape:
    int8 when ``symmetric``, uint8 otherwise.
    """
    qmin, qmax = affine_qrange(bits, symmetric)
    Wg = _view_like(W.float(), scale)  # (R, g, n)
    q = torch.round(Wg / scale.unsqueeze(-1))
    if zero is not None and not symmetric:
        q = q + zero.unsqueeze(-1)
    q = q.clamp(qmin, qmax).reshape(W.shape)
    return q.to(torch.int8 if symmetric else torch.uint8)


@torch.no_grad()
def affine_dequantize(codes: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """``(codes - zero) * scale`` in float32, shaped like ``codes``."""
    q = _view_like(codes.float(), scale)  # (R, g, n)
    if zero is not None:
        q = q - zero.unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(codes.shape)


def affine_fake_quantize(
    W: Tensor, *, bits: int, symmetric: bool, granularity: Granularity = PerChannel(), clip_search: bool = False
) -> Tensor:
    """Round ``W`` to the format and back (float32): the reconstruction RTN gives."""
    scale, zero = affine_params(W, bits=bits, symmetric=symmetric, granularity=granularity, clip_search=clip_search)
    return affine_dequantize(affine_quantize(W, scale, zero, bits=bits, symmetric=symmetric), scale, zero)
