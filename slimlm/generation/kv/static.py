"""The static KV cache: pre-allocated contiguous K/V per layer, keys stored rotated (the default cache)."""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.kv.protocol import CacheSpec, KVView, RopeFn, attention_mask


class StaticKVCache:
    """Pre-allocated contiguous K/V per layer: (B, Hkv, max_len, D); keys stored rotated.

    Slots are filled left to right for all rows at once; ``slot_pos`` (B,
    max_len) records each slot's position (-1 for empty or padding), and the
    mask is derived from it once per step.
    """

    raw_keys = False

    def __init__(self, spec: CacheSpec, *, batch: int, max_len: int):
        if batch < 1 or max_len < 1:
            raise SlimlmError(f"cache batch and max_len must be >= 1, got batch={batch}, max_len={max_len}")
        self.spec, self.batch, self.max_len = spec, batch, max_len
        kw = dict(dtype=spec.dtype, device=spec.device)
        self.k = [torch.zeros(batch, h, max_len, spec.head_dim, **kw) for h in spec.kv_heads]
        self.v = [torch.zeros(batch, h, max_len, spec.head_dim, **kw) for h in spec.kv_heads]
        self.slot_pos = torch.full((batch, max_len), -1, dtype=torch.long, device=spec.device)
        self._length = 0
        self._start = 0
        self._mask: Tensor | None = None
        self._has_holes = False  # some written slot is padding (or was cropped into): masks needed

    @property
    def length(self) -> int:
        return self._length

    def _begin(self, positions: Tensor) -> None:
        """Layer 0 of a forward: claim the slots and build the step's mask."""
        B, T = positions.shape
        start, end = self._length, self._length + T
        if B != self.batch:
            raise SlimlmError(f"cache was built for batch {self.batch}, got a forward of batch {B}")
        if end > self.max_len:
            raise SlimlmError(f"KV cache full: {end} slots needed, max_len is {self.max_len}; "
                              "build the cache with a larger max_len (prompt + max_new_tokens)")
        self.slot_pos[:, start:end] = positions
        if T > 1 or B > 1:  # a batched step may carry padding (finished rows); reading it back would sync
            self._has_holes = self._has_holes or B > 1 or bool((positions < 0).any())
        self._start, self._length = start, end
        window = self.spec.sliding_window
        if T == 1 and not self._has_holes and (window is None or end <= window):
            self._mask = None  # one query after every stored key: nothing to hide
        else:
            self._mask = attention_mask(self.slot_pos[:, :end], positions, window)

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope: RopeFn | None = None) -> KVView:
        if layer == 0:
            self._begin(positions)
        start, end = self._start, self._length
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return KVView(self.k[layer][:, :, :end], self.v[layer][:, :, :end], self._mask, positions)

    def wants_scores(self, layer: int) -> bool:
        return False

    def observe(self, layer: int, probs: Tensor) -> None:
        return None

    def crop(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise SlimlmError(f"cannot crop the KV cache to {length}; it holds {self._length} slots")
        self.slot_pos[:, length:] = -1
        self._length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
