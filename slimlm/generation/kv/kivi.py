"""The KIVI-quantized KV cache: the whole history, keys per channel and values per token, but for a float residual.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache" (the format and its config are in :mod:`slimlm.generation.kv.quant`).
A forward of ``T`` tokens gives exactly what ``T`` one-token forwards give:
each query sees each token in the version (quantized or float) it would have
seen stepwise (:func:`~slimlm.generation.kv.quant.kivi_regions`), so long
texts can be scored in chunks. ``nbytes()`` counts codes, scales and the
float residuals, not the position bookkeeping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.kv.protocol import CacheSpec, KVView, tensor_bytes
from slimlm.generation.kv.quant import (KIVI, QuantizedKV, cat_quantized, dequantize_keys, dequantize_values,
                                        kivi_mask, kivi_regions, quantize_keys, quantize_values)


class KIVICache:
    """The whole history, KIVI-quantized (keys per channel, values per token) but for a float residual.

    See the module docstring: a forward of ``T`` tokens equals ``T`` one-token forwards.
    """

    raw_keys = False

    def __init__(self, spec: CacheSpec, *, batch: int, max_len: int | None = None, quant: KIVI):
        quant.check_head_dim(spec.head_dim)
        self.spec, self.batch, self.quant = spec, batch, quant
        L = spec.n_layers
        self.kq: list[QuantizedKV | None] = [None] * L  # keys of tokens [0, nk)
        self.vq: list[QuantizedKV | None] = [None] * L  # values of tokens [0, nv)
        self.k_res = [torch.zeros(batch, h, 0, spec.head_dim, dtype=spec.dtype, device=spec.device)
                      for h in spec.kv_heads]  # fmt: skip  # keys of tokens [nk, n)
        self.v_res = [t.clone() for t in self.k_res]  # values of tokens [nv, n)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=spec.device)  # (B, n): not padding
        self._n = self.nk = self.nv = 0
        self._step: tuple | None = None

    @property
    def length(self) -> int:
        return self._n

    def _begin(self, positions: Tensor) -> None:
        B, T = positions.shape
        if B != self.batch:
            raise SlimlmError(f"KIVICache was built for batch {self.batch}, got a forward of batch {B}")
        R, a, b = self.quant.residual, self._n, self._n + T - 1
        regions = kivi_regions(a, b, R)
        self.valid = torch.cat([self.valid, positions >= 0], dim=1)
        mask = None
        if T > 1 or not bool(self.valid.all()):
            q_tok = torch.arange(a, b + 1, device=positions.device)
            slots = torch.cat([torch.arange(lo, hi, device=positions.device) for _, lo, hi in regions])
            mask = kivi_mask(regions, q_tok, R)[None] & self.valid[:, slots][:, None, :]  # (B, T, S)
            mask = (mask | (positions < 0)[:, :, None])[:, None]  # (B, 1, T, S); padding queries see all
        nk_new, nv_new = max(0, (b // R) * R), max(0, b - R)
        self._step = (regions, mask, self.nk, self.nv, nk_new, nv_new)
        self._n, self.nk, self.nv = b + 1, nk_new, nv_new

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope=None) -> KVView:
        if layer == 0:
            self._begin(positions)
        regions, mask, nk, nv, nk_new, nv_new = self._step
        q = self.quant
        kf = torch.cat([self.k_res[layer], k], dim=2)  # float keys of tokens [nk, n)
        vf = torch.cat([self.v_res[layer], v], dim=2)  # float values of tokens [nv, n)
        if nk_new > nk:
            block = quantize_keys(kf[:, :, : nk_new - nk], bits=q.bits, group=q.group)
            self.kq[layer] = cat_quantized(self.kq[layer], block, dim=-3)
        if nv_new > nv:
            block = quantize_values(vf[:, :, : nv_new - nv], bits=q.bits, group=q.value_group)
            self.vq[layer] = cat_quantized(self.vq[layer], block, dim=-2)
        self.k_res[layer], self.v_res[layer] = kf[:, :, nk_new - nk:], vf[:, :, nv_new - nv:]
        kd = dequantize_keys(self.kq[layer], k.dtype) if self.kq[layer] is not None else None  # [0, nk_new)
        vd = dequantize_values(self.vq[layer], v.dtype) if self.vq[layer] is not None else None  # [0, nv_new)
        keys, values = [], []
        for kind, lo, hi in regions:
            keys.append(kf[:, :, lo - nk: hi - nk] if kind == "ff" else kd[:, :, lo:hi])
            values.append(vd[:, :, lo:hi] if kind == "qq" else vf[:, :, lo - nv: hi - nv])
        return KVView(torch.cat(keys, dim=2), torch.cat(values, dim=2), mask, positions)

    def wants_scores(self, layer: int) -> bool:
        return False

    def observe(self, layer: int, probs: Tensor) -> None:
        return None

    def crop(self, length: int) -> None:
        """Drop the newest tokens while the quantized prefix stays what ``length`` tokens would have made."""
        R = self.quant.residual
        if not (0 <= length <= self._n and self.nk == max(0, (length - 1) // R * R)
                and self.nv == max(0, length - 1 - R)):
            raise SlimlmError(f"cannot crop this KIVI cache to {length}: it holds {self._n} tokens and tokens "
                              f"already quantized cannot be un-quantized (keys < {self.nk}, values < {self.nv})")
        for layer in range(self.spec.n_layers):
            self.k_res[layer] = self.k_res[layer][:, :, : length - self.nk]
            self.v_res[layer] = self.v_res[layer][:, :, : length - self.nv]
        self.valid = self.valid[:, :length]
        self._n = length

    def nbytes(self) -> int:
        return tensor_bytes(*self.kq, *self.vq, *self.k_res, *self.v_res)
