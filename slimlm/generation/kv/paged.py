"""Paged KV cache: fixed-size blocks from a shared pool and a block table per sequence.

PagedAttention (Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention"): a sequence's keys and values
live in blocks of ``block_size`` tokens allocated as it grows, found through
its block table, so requests of very different lengths reserve no memory
for tokens they never produce, and a finished request's blocks go back to
the pool at once. Padding tokens (position < 0) take no space.

Token at position p of row b lives in block ``table[b, p // block_size]`` at
offset ``p % block_size``. Attention gathers a row's blocks into a dense
(B, Hkv, S, D) view per layer (plain torch; a fused paged-attention kernel
would read the blocks in place). Block 0 is a zero block that unallocated
table entries point at.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.kv.protocol import CacheSpec, KVView, RopeFn, attention_mask


class PagedKVCache:
    """KV cache in blocks; same protocol and same logits as :class:`StaticKVCache`."""

    raw_keys = False

    def __init__(self, spec: CacheSpec, *, batch: int, max_len: int, block_size: int = 16,
                 n_blocks: int | None = None):
        if block_size < 1 or batch < 1 or max_len < 1:
            raise SlimlmError(f"paged cache needs block_size, batch and max_len >= 1, got {block_size}, {batch}, "
                              f"{max_len}")
        self.spec, self.batch, self.max_len, self.block_size = spec, batch, max_len, block_size
        self.max_blocks = math.ceil(max_len / block_size)  # per sequence
        n_blocks = n_blocks or batch * self.max_blocks + 1  # worst case, plus the zero block
        kw = dict(dtype=spec.dtype, device=spec.device)
        self.k = [torch.zeros(n_blocks, h, block_size, spec.head_dim, **kw) for h in spec.kv_heads]
        self.v = [torch.zeros(n_blocks, h, block_size, spec.head_dim, **kw) for h in spec.kv_heads]
        self.free = list(range(n_blocks - 1, 0, -1))  # block 0 is the shared zero block
        self.table = torch.zeros(batch, self.max_blocks, dtype=torch.long, device=spec.device)
        self.lens = [0] * batch  # tokens stored per row
        self.peak_blocks = 0
        self.peak_tokens = 0  # most tokens held at once: the floor for any allocator
        self._step: tuple | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return max(self.lens)

    @property
    def used_blocks(self) -> int:
        return int((self.table > 0).sum())

    def block_bytes(self) -> int:
        return sum(k[0].numel() * k.element_size() * 2 for k in self.k)  # K and V, all layers

    def nbytes(self) -> int:
        """Bytes of the blocks in use (the pool may hold more, shareable with other requests)."""
        return self.used_blocks * self.block_bytes()

    def _grow(self, row: int, new_len: int) -> None:
        if new_len > self.max_len:
            raise SlimlmError(f"KV cache full: row {row} needs {new_len} positions, max_len is {self.max_len}")
        have = math.ceil(self.lens[row] / self.block_size)
        for j in range(have, math.ceil(new_len / self.block_size)):
            if not self.free:
                raise SlimlmError(f"paged KV cache out of blocks ({self.k[0].shape[0] - 1}); build it with more "
                                  "n_blocks")
            self.table[row, j] = self.free.pop()
        self.lens[row] = new_len

    def release(self, row: int, keep: int = 0) -> None:
        """Give back a row's blocks past its first ``keep`` positions."""
        first = math.ceil(keep / self.block_size)
        for j in range(first, self.max_blocks):
            blk = int(self.table[row, j])
            if blk:
                self.free.append(blk)
                self.table[row, j] = 0
        self.lens[row] = min(self.lens[row], keep)

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise SlimlmError(f"cannot crop the KV cache to {length}; it holds {self.length} positions")
        for row in range(self.batch):
            self.release(row, keep=length)

    # -- the protocol --------------------------------------------------------------------------
    def _begin(self, positions: Tensor) -> None:
        """Layer 0: allocate blocks for the new positions, precompute scatter indices and the mask."""
        if positions.shape[0] != self.batch:
            raise SlimlmError(f"cache was built for batch {self.batch}, got a forward of batch {positions.shape[0]}")
        for row, top in enumerate((positions.max(dim=1).values + 1).tolist()):
            if top > self.lens[row]:
                self._grow(row, top)
        self.peak_blocks = max(self.peak_blocks, self.used_blocks)
        self.peak_tokens = max(self.peak_tokens, sum(self.lens))
        b_idx, t_idx = (positions >= 0).nonzero(as_tuple=True)  # (N,) each: the real tokens
        p = positions[b_idx, t_idx]
        dest = (self.table[b_idx, p // self.block_size], p % self.block_size)  # (block, offset) per token
        n_blk = math.ceil(self.length / self.block_size)
        S = n_blk * self.block_size
        j = torch.arange(S, device=positions.device)[None]  # (1, S)
        lens = torch.tensor(self.lens, device=positions.device)[:, None]  # (B, 1)
        key_pos = torch.where(j < lens, j, -1)  # (B, S)
        mask = attention_mask(key_pos, positions, self.spec.sliding_window)
        self._step = (b_idx, t_idx, dest, n_blk, mask)

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope: RopeFn | None = None) -> KVView:
        if layer == 0:
            self._begin(positions)
        b_idx, t_idx, (blk, off), n_blk, mask = self._step
        self.k[layer][blk, :, off] = k.transpose(1, 2)[b_idx, t_idx]  # (N, Hkv, D)
        self.v[layer][blk, :, off] = v.transpose(1, 2)[b_idx, t_idx]
        return KVView(self._gather(self.k[layer], n_blk), self._gather(self.v[layer], n_blk), mask, positions)

    def _gather(self, pool: Tensor, n_blk: int) -> Tensor:
        B, (_, H, bs, D) = self.batch, pool.shape
        blocks = pool[self.table[:, :n_blk]]  # (B, n_blk, Hkv, bs, D)
        return blocks.transpose(1, 2).reshape(B, H, n_blk * bs, D)  # (B, Hkv, S, D)

    def wants_scores(self, layer: int) -> bool:
        return False

    def observe(self, layer: int, probs: Tensor) -> None:
        return None

