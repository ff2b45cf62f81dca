"""Compressed KV caches behind one decoder: a policy or KIVI config -> its cache class, and a
decoder wrapper that builds that cache for :mod:`slimlm.generation.loop` and feeds long prompts
in pieces an evicting cache can take."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.kv.evicting import EvictingCache, H2OCache, SinkCache
from slimlm.generation.kv.kivi import KIVICache
from slimlm.generation.kv.policies import H2O, Policy, Sinks, Window
from slimlm.generation.kv.protocol import CacheSpec
from slimlm.generation.kv.quant import KIVI
from slimlm.models.adapters import fast_decoder_families


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
            raise SlimlmError(f"KV-cache policies need the fast decoder ({', '.join(fast_decoder_families())}); "
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
        if not isinstance(cache, EvictingCache):
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
