"""NormalFloat4 (NF4), blockwise, with optional double quantization.

Dettmers, Pagnoni, Holtzman, Zettlemoyer. "QLoRA: Efficient Finetuning of
Quantized LLMs", NeurIPS 2023 (arXiv:2305.14314), section 3 and appendix E.

* The 16 NF4 values are quantiles of N(0, 1) normalised to [-1, 1], built
  asymmetrically so that 0 is exact: 8 positive quantiles of
  ``linspace(offset, 0.5, 9)``, 7 negative ones of ``linspace(offset, 0.5, 8)``,
  with ``offset = 1 - (1/32 + 1/30) / 2``. :data:`NF4_VALUES` is that table.
* The flattened weight is cut into blocks of ``block_size`` (64) elements,
  each with its own float32 absmax ``c``; a weight is coded as the nearest
  NF4 value of ``w / c``. Storage: 4 + 32/64 = 4.5 bits per weight.
* Double quantization quantizes the absmax constants themselves: subtract
  their mean, then 8 bits per constant in blocks of 256 with one float32
  scale per block: 4 + 8/64 + 32/(64*256) ≈ 4.127 bits per weight.
  The paper uses an 8-bit *float* for the second level; this spec uses
  symmetric linear int8 on the mean-centred constants (same size, simpler
  to state, well within the first level's own error).

The last block of a tensor whose size is not a multiple of the block size
is ragged (padded with zeros while computing its absmax).
"""

from __future__ import annotations

import torch
from torch import Tensor

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_OFFSET = 1.0 - (1.0 / 32 + 1.0 / 30) / 2
DQ_BLOCK = 256
DQ_QMAX = 127
_TINY = 1e-12


def nf4_values(device: torch.device | str = "cpu") -> Tensor:
    """The 16 NF4 code values, ascending, float32 ``(16,)``; code 7 is 0.0."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def nf4_values_from_quantiles() -> Tensor:
    """Recompute :data:`NF4_VALUES` from normal quantiles (float64, for checking)."""
    q = torch.special.ndtri
    pos = q(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    neg = -q(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return v / v.abs().max()


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """Flatten and cut into ``(n_blocks, block_size)``, zero-padding the last block."""
    flat = x.reshape(-1)
    n_blocks = -(-flat.numel() // block_size)
    flat = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
    return flat.reshape(n_blocks, block_size)  # (n_blocks, block_size)


@torch.no_grad()
def nf4_absmax(W: Tensor, block_size: int = 64) -> Tensor:
    """Per-block absmax of the flattened ``W``: float32 ``(ceil(numel / block_size),)``."""
    return _blocks(W.float(), block_size).abs().amax(dim=-1)


@torch.no_grad()
def nf4_quantize(W: Tensor, absmax: Tensor, block_size: int = 64) -> Tensor:
    """NF4 codes (uint8 in 0..15, shaped like ``W``): nearest value of ``w / absmax``."""
    values = nf4_values(W.device)
    mids = (values[1:] + values[:-1]) / 2  # (15,) decision boundaries
    x = _blocks(W.float(), block_size) / absmax.clamp(min=_TINY).unsqueeze(-1)  # (n_blocks, block_size)
    codes = torch.bucketize(x, mids)  # ties go to the lower value
    return codes.reshape(-1)[: W.numel()].reshape(W.shape).to(torch.uint8)


@torch.no_grad()
def nf4_dequantize(codes: Tensor, absmax: Tensor, block_size: int = 64) -> Tensor:
    """``NF4_VALUES[codes] * absmax`` per block, float32 shaped like ``codes``."""
    v = nf4_values(codes.device)[_blocks(codes.long(), block_size)]  # (n_blocks, block_size)
    return (v * absmax.unsqueeze(-1)).reshape(-1)[: codes.numel()].reshape(codes.shape)


@torch.no_grad()
def double_quantize(absmax: Tensor, block_size: int = DQ_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize absmax constants: ``(codes int8 (n,), scale fp32 (ceil(n/256),), offset fp32 (1,))``."""
    offset = absmax.float().mean().reshape(1)  # (1,)
    c = _blocks(absmax.float() - offset, block_size)  # (n2, 256)
    scale = (c.abs().amax(dim=-1) / DQ_QMAX).clamp(min=_TINY)  # (n2,)
    codes = torch.round(c / scale.unsqueeze(-1)).clamp(-DQ_QMAX, DQ_QMAX)
    return codes.reshape(-1)[: absmax.numel()].to(torch.int8), scale, offset


@torch.no_grad()
def double_dequantize(codes: Tensor, scale: Tensor, offset: Tensor, block_size: int = DQ_BLOCK) -> Tensor:
    """The absmax constants back from :func:`double_quantize`, float32 ``(n,)``."""
    c = _blocks(codes.float(), block_size) * scale.unsqueeze(-1)  # (n2, 256)
    return c.reshape(-1)[: codes.numel()] + offset
