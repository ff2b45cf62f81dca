"""Weight quantization schemes (what users write in configs) and QuantizedWeight.

A scheme is a frozen dataclass that validates itself and names the allowed
values when it refuses one. The functions that realise each scheme
(quantize, dequantize, pack, unpack) live in :mod:`slimlm.formats.codec`,
in one registry keyed by scheme type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.formats.affine import check_bits
from slimlm.formats.granularity import WEIGHT_GRANULARITIES, PerChannel, PerGroup, PerTensor
from slimlm.formats.kmeans import KMeansInit
from slimlm.validate import check_bool, check_min_int


@dataclass(frozen=True)
class IntScheme:
    """Linear integer format: ``bits`` in 2..8, symmetric (absmax) or asymmetric (zero point).

    Storage: ``bits`` per code, a float16 scale per tensor/row/group, and a
    float16 zero point per group when asymmetric (int4 g64 asym = 4.5 bpw).
    """

    bits: int = 4
    symmetric: bool = False
    granularity: PerTensor | PerChannel | PerGroup = PerGroup(64)
    clip_search: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_bool("symmetric", self.symmetric)
        check_bool("clip_search", self.clip_search)
        if not isinstance(self.granularity, WEIGHT_GRANULARITIES):
            raise SlimlmError(
                f"weight granularity must be PerTensor(), PerChannel() or PerGroup(size), got {self.granularity!r}"
            )


@dataclass(frozen=True)
class NF4Scheme:
    """QLoRA NormalFloat4: float32 absmax per ``block_size`` block (4.5 bpw at 64),
    or 8-bit double-quantized absmax in blocks of 256 (≈4.127 bpw at 64)."""

    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        check_min_int("block_size", self.block_size, 2, "e.g. 32, 64, 128, 256")
        check_bool("double_quant", self.double_quant)


@dataclass(frozen=True)
class KMeansScheme:
    """``2^bits`` k-means centroids (float16 codebook) per row or per tensor; bits in 1..8."""

    bits: int = 4
    per_row: bool = True
    iters: int = 20
    init: KMeansInit = KMeansInit.LINEAR

    def __post_init__(self) -> None:
        check_bits(self.bits, low=1, high=8)
        check_bool("per_row", self.per_row)
        check_min_int("iters", self.iters, 0, "Lloyd iterations, e.g. 20")
        if not isinstance(self.init, KMeansInit):
            allowed = ", ".join(f"KMeansInit.{m.name}" for m in KMeansInit)
            raise SlimlmError(f"init must be one of {allowed}, got {self.init!r}")


@dataclass(frozen=True)
class TernaryScheme:
    """Per-row ``{-a, 0, +a}`` (TWN threshold ``threshold * mean|W|``), float16 scale.

    ``pack_base3`` stores 5 trits per byte (1.6 bits); otherwise 2 bits per code.
    """

    threshold: float = 0.7
    pack_base3: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise SlimlmError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise SlimlmError(f"threshold must be in [0, 1] (TWN uses 0.7), got {self.threshold!r}")
        check_bool("pack_base3", self.pack_base3)


@dataclass(frozen=True)
class BinaryScheme:
    """Per-row ``a * sign(W)``, ``a = mean|W|`` (float16): 1 bit per weight plus the scale."""


Scheme = IntScheme | NF4Scheme | KMeansScheme | TernaryScheme | BinaryScheme
SCHEME_TYPES = (IntScheme, NF4Scheme, KMeansScheme, TernaryScheme, BinaryScheme)


@dataclass(frozen=True, eq=False)
class DoubleQuant:
    """Double-quantized NF4 absmax: ``absmax ≈ codes * scale[block] + offset``."""

    codes: Tensor  # int8 (n_blocks,)
    scale: Tensor  # float32 (ceil(n_blocks / 256),)
    offset: Tensor  # float32 (1,)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight in a scheme's format, codes unpacked (one integer per weight).

    ``codes`` has the weight's shape ``(out, in)``: int8 for symmetric int,
    ternary and binary; uint8 for asymmetric int, NF4 and k-means indices.
    Which of the other tensors are set depends on the scheme:

    ===========  ======================================================
    IntScheme    scale (R, g), zero (R, g) if asymmetric (see affine)
    NF4Scheme    scale = absmax (n_blocks,), or dq when double-quantized
    KMeans       codebook (out or 1, 2^bits), ascending
    Ternary      scale (out, 1)
    Binary       scale (out, 1)
    ===========  ======================================================

    Float tensors are float32 holding values exact in their storage dtype.
    """

    scheme: Scheme
    shape: tuple[int, int]
    codes: Tensor
    scale: Tensor | None = None
    zero: Tensor | None = None
    codebook: Tensor | None = None
    dq: DoubleQuant | None = None

    def __post_init__(self) -> None:
        if tuple(self.codes.shape) != tuple(self.shape):
            raise SlimlmError(f"codes shape {tuple(self.codes.shape)} does not match weight shape {self.shape}")

    @property
    def device(self) -> torch.device:
        return self.codes.device
