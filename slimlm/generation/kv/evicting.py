"""Evicting KV caches for slimlm's decoder (the protocol in :mod:`slimlm.generation.kv.protocol`).

* :class:`SinkCache` -- StreamingLLM sinks + recent window (``Sinks``) or the
  window alone (``Window``). A ring buffer: the new token takes the evicted
  token's slot, nothing is moved. Keys are stored *before* rotary and rotated
  each step at their position inside the cache (their rank by stream order),
  so positions never exceed the budget.
* :class:`H2OCache` -- heavy hitters + recent window. Kept slots are packed to
  the front in stream order, so a slot's index is its in-cache position;
  accumulated attention per KV head (summed over its query heads) comes back
  through ``observe``.

Which slots survive is decided by the pure functions of
:mod:`slimlm.generation.kv.policies`. A forward of ``T`` tokens into a full
evicting cache first evicts down to ``budget - T`` slots, then the ``T``
tokens attend causally among themselves: for ``T = 1`` this is the papers'
rule (the new token plus ``budget - 1`` cached ones), for prompts it is what
a chunked prefill gives. Evicting caches serve unpadded rows only (every row
at the same positions). ``nbytes()`` counts the K/V tensors held (and H2O's
scores), not the position bookkeeping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.generation.kv.policies import H2O, Policy, Sinks, Window, h2o_keep, keep_slots
from slimlm.generation.kv.protocol import CacheSpec, KVView, attention_mask, tensor_bytes
from slimlm.generation.rope import apply_rotary


def _check_rows(positions: Tensor, batch: int, name: str) -> None:
    if positions.shape[0] != batch:
        raise SlimlmError(f"{name} was built for batch {batch}, got a forward of batch {positions.shape[0]}")
    if bool((positions < 0).any()):
        raise SlimlmError(f"{name} serves unpadded rows only; run prompts of different lengths one at a time")


class EvictingCache:
    """Shared state of the evicting caches: buffers of ``budget`` slots per layer, raw keys."""

    raw_keys = True

    def __init__(self, spec: CacheSpec, *, batch: int, policy: Policy):
        self.spec, self.batch, self.policy = spec, batch, policy
        kw = dict(dtype=spec.dtype, device=spec.device)
        cap = policy.budget
        self.k = [torch.zeros(batch, h, cap, spec.head_dim, **kw) for h in spec.kv_heads]
        self.v = [torch.zeros(batch, h, cap, spec.head_dim, **kw) for h in spec.kv_heads]
        self._n = 0  # slots held, the same in every layer and head
        self.seen = 0  # tokens of the stream written so far
        self._mask: Tensor | None = None
        self._q_pos: Tensor | None = None

    @property
    def length(self) -> int:
        return self._n

    def _max_forward(self) -> int:
        """Most tokens one forward may bring once the cache is full."""
        raise NotImplementedError

    def _begin_common(self, positions: Tensor, rope) -> tuple[int, int]:
        """Checks; returns ``(T, n_after)``; sets the queries' in-cache positions."""
        _check_rows(positions, self.batch, type(self).__name__)
        if self.policy.budget > rope.max_positions:
            raise SlimlmError(f"KV budget {self.policy.budget} exceeds the model's {rope.max_positions} rotary "
                              "positions; use a smaller budget")
        T = positions.shape[1]
        if T > self.policy.budget:
            raise SlimlmError(f"a forward of {T} tokens exceeds the KV budget {self.policy.budget}; "
                              "feed the tokens in pieces of at most the budget")
        if self._n + T > self.policy.budget and T > self._max_forward():
            raise SlimlmError(f"a forward of {T} tokens does not fit a full {type(self.policy).__name__} cache "
                              f"(at most {self._max_forward()} at a time); feed the tokens in smaller pieces")
        n_after = min(self._n + T, self.policy.budget)
        self.seen += T
        self._q_pos = torch.arange(n_after - T, n_after, device=positions.device).expand(self.batch, T)
        return T, n_after

    def room(self) -> int:
        """The most tokens the next forward may bring (the free slots, or what a full cache takes)."""
        return min(self.policy.budget, max(self.policy.budget - self._n, self._max_forward()))

    def wants_scores(self, layer: int) -> bool:
        return False

    def observe(self, layer: int, probs: Tensor) -> None:
        return None

    def nbytes(self) -> int:
        return tensor_bytes(*self.k, *self.v)


class SinkCache(EvictingCache):
    """StreamingLLM (``Sinks``) or window-only (``Window``) eviction over a ring buffer of ``budget`` slots."""

    def __init__(self, spec: CacheSpec, *, batch: int, max_len: int | None = None, policy: Sinks | Window):
        if not isinstance(policy, (Sinks, Window)):
            raise SlimlmError(f"SinkCache takes a Sinks or Window policy, got {policy!r}")
        super().__init__(spec, batch=batch, policy=policy)
        self.sinks = policy.sinks if isinstance(policy, Sinks) else 0
        # order[i]: the physical slot of the i-th oldest held token.
        self.order = torch.empty(0, dtype=torch.long, device=spec.device)
        self._slots: Tensor | None = None
        self._cos = self._sin = None

    def _max_forward(self) -> int:
        return self.policy.budget - self.sinks

    def _begin(self, positions: Tensor, rope) -> None:
        """Layer 0: choose the slots of the new tokens and the in-cache rotation of every slot."""
        T, n_after = self._begin_common(positions, rope)
        n, dev = self._n, self.order.device
        keep = keep_slots(self.policy, n + T).to(dev)  # (n_after,) over [old tokens..., new tokens...]
        kept_old = keep[keep < n]
        evicted = torch.ones(n, dtype=torch.bool, device=dev)
        evicted[kept_old] = False
        free = torch.cat([self.order[evicted], torch.arange(n, min(n + T, self.policy.budget), device=dev)])
        self._slots = free[:T]  # the T new tokens fill the freed and never-used slots
        self.order = torch.cat([self.order[kept_old], self._slots])  # (n_after,)
        rank = torch.empty(n_after, dtype=torch.long, device=dev)
        rank[self.order] = torch.arange(n_after, device=dev)  # in-cache position of each physical slot
        self._cos = rope.cos[rank][None, None]  # (1, 1, S, D)
        self._sin = rope.sin[rank][None, None]
        self._mask = None if T == 1 else attention_mask(rank.expand(self.batch, n_after), self._q_pos)
        self._n = n_after

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope) -> KVView:
        if layer == 0:
            self._begin(positions, rope)
        n = self._n
        self.k[layer][:, :, self._slots] = k
        self.v[layer][:, :, self._slots] = v
        keys = apply_rotary(self.k[layer][:, :, :n], self._cos, self._sin)  # (B, Hkv, S, D) at in-cache positions
        return KVView(keys, self.v[layer][:, :, :n], self._mask, self._q_pos)

    def crop(self, length: int) -> None:
        """Forget all but the ``length`` oldest held tokens (evicted ones do not come back)."""
        if not 0 <= length <= self._n:
            raise SlimlmError(f"cannot crop the KV cache to {length}; it holds {self._n} slots")
        keep = self.order[:length]
        for buf in (*self.k, *self.v):
            buf[:, :, :length] = buf[:, :, keep]  # packed back in stream order
        self.order = torch.arange(length, device=self.order.device)
        self._n = length


class H2OCache(EvictingCache):
    """H2O eviction: per KV head, the heavy hitters by accumulated attention plus the recent tokens."""

    def __init__(self, spec: CacheSpec, *, batch: int, max_len: int | None = None, policy: H2O):
        if not isinstance(policy, H2O):
            raise SlimlmError(f"H2OCache takes an H2O policy, got {policy!r}")
        super().__init__(spec, batch=batch, policy=policy)
        self.scores = [torch.zeros(batch, h, policy.budget, dtype=torch.float32, device=spec.device)
                       for h in spec.kv_heads]  # fmt: skip
        self._n_before = 0
        self._cos = self._sin = None

    def _max_forward(self) -> int:
        return self.policy.n_recent  # the new tokens must fall in the protected recent window

    def _begin(self, positions: Tensor, rope) -> None:
        self._n_before = self._n
        T, n_after = self._begin_common(positions, rope)
        self._cos, self._sin = rope.cos[:n_after][None, None], rope.sin[:n_after][None, None]  # (1, 1, S, D)
        self._mask = None if T == 1 else attention_mask(
            torch.arange(n_after, device=positions.device).expand(self.batch, n_after), self._q_pos)
        self._n = n_after

    def _evict(self, layer: int, T: int) -> int:
        """Pack the kept old slots of ``layer`` to the front; returns where the new tokens go."""
        n, budget = self._n_before, self.policy.budget
        if n + T <= budget:
            return n
        scores = self.scores[layer][:, :, :n]  # (B, Hkv, n)
        pad = scores.new_zeros(*scores.shape[:-1], T)  # the new tokens: protected by the recent window
        keep = h2o_keep(torch.cat([scores, pad], dim=-1), budget, self.policy.n_recent)  # (B, Hkv, budget)
        kept_old = keep[..., : budget - T]  # ascending, so the new tokens are the last T kept
        for buf in (self.k[layer], self.v[layer]):
            idx = kept_old.unsqueeze(-1).expand(-1, -1, -1, buf.shape[-1])  # (B, Hkv, budget - T, D)
            buf[:, :, : budget - T] = buf.gather(2, idx)
        self.scores[layer][:, :, : budget - T] = scores.gather(2, kept_old)
        return budget - T

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope) -> KVView:
        if layer == 0:
            self._begin(positions, rope)
        T, n = k.shape[2], self._n
        start = self._evict(layer, T)
        self.k[layer][:, :, start:n] = k
        self.v[layer][:, :, start:n] = v
        self.scores[layer][:, :, start:n] = 0.0
        keys = apply_rotary(self.k[layer][:, :, :n], self._cos, self._sin)  # slot i at position i
        return KVView(keys, self.v[layer][:, :, :n], self._mask, self._q_pos)

    def wants_scores(self, layer: int) -> bool:
        return True

    def observe(self, layer: int, probs: Tensor) -> None:
        """Accumulate ``probs (B, Hq, T, S)`` per KV head: the sum over its query heads and the T queries."""
        B, Hq, T, S = probs.shape
        Hkv = self.scores[layer].shape[1]
        self.scores[layer][:, :, :S] += probs.reshape(B, Hkv, Hq // Hkv * T, S).sum(dim=2)  # (B, Hkv, S)

    def crop(self, length: int) -> None:
        if not 0 <= length <= self._n:
            raise SlimlmError(f"cannot crop the KV cache to {length}; it holds {self._n} slots")
        self._n = length  # slots are in stream order: the newest are the last

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(*self.scores)
