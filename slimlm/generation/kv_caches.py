"""Compressed KV caches for slimlm's decoder (the protocol in :mod:`slimlm.generation.cache`).

* :class:`SinkCache` -- StreamingLLM sinks + recent window (``Sinks``) or the
  window alone (``Window``). A ring buffer: the new token takes the evicted
  token's slot, nothing is moved. Keys are stored *before* rotary and rotated
  each step at their position inside the cache (their rank by stream order),
  so positions never exceed the budget.
* :class:`H2OCache` -- heavy hitters + recent window. Kept slots are packed to
  the front in stream order, so a slot's index is its in-cache position;
  accumulated attention per KV head (summed over its query heads) comes back
  through ``observe``.
* :class:`KIVICache` -- full history, KIVI-quantized except a float residual
  window. A forward of ``T`` tokens gives exactly what ``T`` one-token forwards
  give: each query sees each token in the version (quantized or float) it
  would have seen stepwise (:func:`~slimlm.generation.kv_quant.kivi_regions`),
  so long texts can be scored in chunks.

A forward of ``T`` tokens into a full evicting cache first evicts down to
``budget - T`` slots, then the ``T`` tokens attend causally among themselves:
for ``T = 1`` this is the papers' rule (the new token plus ``budget - 1``
cached ones), for prompts it is what a chunked prefill gives. Evicting caches
serve unpadded rows only (every row at the same positions). ``nbytes()``
counts the K/V tensors held (codes, scales, residuals, H2O scores), not the
position bookkeeping.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.cache import CacheSpec, KVView, attention_mask
from slimlm.generation.kv_policies import H2O, Policy, Sinks, Window, h2o_keep, keep_slots, parse_policy
from slimlm.generation.kv_quant import (KIVI, QuantizedKV, cat_quantized, dequantize_keys, dequantize_values,
                                        kivi_mask, kivi_regions, quantize_keys, quantize_values)
from slimlm.generation.rope import apply_rotary


def _tensor_bytes(*ts: Tensor | QuantizedKV | None) -> int:
    total = 0
    for t in ts:
        if isinstance(t, QuantizedKV):
            total += t.nbytes
        elif t is not None:
            total += t.numel() * t.element_size()
    return total


def _check_rows(positions: Tensor, batch: int, name: str) -> None:
    if positions.shape[0] != batch:
        raise SlimlmError(f"{name} was built for batch {batch}, got a forward of batch {positions.shape[0]}")
    if bool((positions < 0).any()):
        raise SlimlmError(f"{name} serves unpadded rows only; run prompts of different lengths one at a time")


class _Evicting:
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
        return _tensor_bytes(*self.k, *self.v)


class SinkCache(_Evicting):
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


class H2OCache(_Evicting):
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
        return super().nbytes() + _tensor_bytes(*self.scores)


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
        return _tensor_bytes(*self.kq, *self.vq, *self.k_res, *self.v_res)


def make_kv_cache(spec: CacheSpec, kind: Policy | KIVI, *, batch: int = 1, max_len: int | None = None):
    """The cache class for a policy (``Window``, ``Sinks``, ``H2O``) or a ``KIVI`` quantization config."""
    if isinstance(kind, (Sinks, Window)):
        return SinkCache(spec, batch=batch, max_len=max_len, policy=kind)
    if isinstance(kind, H2O):
        return H2OCache(spec, batch=batch, max_len=max_len, policy=kind)
    if isinstance(kind, KIVI):
        return KIVICache(spec, batch=batch, max_len=max_len, quant=kind)
    raise SlimlmError(f"no compressed KV cache for {kind!r}; use Window, Sinks, H2O or KIVI")


class KVCompressedDecoder(nn.Module):
    """A fast decoder whose ``new_cache`` builds a compressed cache (for ``slimlm.generation.loop``).

    A long prompt fills an evicting cache in one forward up to its budget, then
    goes on in pieces of ``chunk`` tokens (default ``budget // 8``: each token
    sees at least 7/8 of the budget; ``chunk=1`` is exact token-by-token
    streaming). ``last_cache`` is the cache of the latest generation.
    """

    def __init__(self, decoder: nn.Module, kind: Policy | KIVI, *, chunk: int | None = None):
        super().__init__()
        if not hasattr(decoder, "cache_spec"):
            raise SlimlmError("KV-cache policies need the fast decoder (llama, mistral, qwen2/3, gemma); "
                              f"this model runs on {type(decoder).__name__}")
        if chunk is not None and chunk < 1:
            raise SlimlmError(f"chunk must be >= 1, got {chunk}")
        self.decoder, self.kind = decoder, kind
        self.chunk = chunk or max(1, getattr(kind, "budget", 8) // 8)
        self.last_cache = None

    def new_cache(self, batch: int, max_len: int):
        self.decoder.ensure_positions(max_len)  # the decoder indexes its table at stream positions
        self.last_cache = make_kv_cache(self.decoder.cache_spec(), self.kind, batch=batch, max_len=max_len)
        return self.last_cache

    def _piece(self, cache, left: int) -> int:
        if not isinstance(cache, _Evicting):
            return left  # KIVI: any length, exactly
        free = cache.policy.budget - cache.length
        return min(left, free if free > 0 else min(self.chunk, cache.room()))

    def forward(self, input_ids: Tensor, positions: Tensor, cache, *, n_logits: int | None = None) -> Tensor:
        T = input_ids.shape[1]
        first_wanted = 0 if n_logits is None else T - n_logits  # logits of tokens >= this are returned
        outs, s = [], 0
        while s < T:
            c = self._piece(cache, T - s)
            wanted = min(c, s + c - first_wanted)  # this piece's last `wanted` tokens are returned
            out = self.decoder(input_ids[:, s:s + c], positions[:, s:s + c], cache, n_logits=max(wanted, 1))
            if wanted > 0:
                outs.append(out)
            s += c
        return torch.cat(outs, dim=1)  # (B, n_logits or T, V)


def kv_decoder(decoder: nn.Module, *, policy: str | None, budget: int | None, sinks: int = 4,
               bits: int | None = None) -> KVCompressedDecoder | None:
    """CLI flags -> a decoder with a compressed cache, or None for the plain static cache."""
    if bits is not None and policy not in (None, "full"):
        raise SlimlmError("--kv-bits (a KIVI-quantized full cache) and --kv-policy (eviction) do not combine; "
                          "choose one")
    if bits is not None:
        return KVCompressedDecoder(decoder, KIVI(bits))
    if policy is None and budget is not None:
        raise SlimlmError("--kv-budget needs --kv-policy (window, sinks or h2o)")
    kind = parse_policy(policy, budget, sinks=sinks) if policy is not None else None
    return KVCompressedDecoder(decoder, kind) if kind is not None else None
