"""KV caches for slimlm's decoder: the protocol every cache follows, and the caches.

- ``protocol``: ``KVCache`` (what the attention asks a cache), ``CacheSpec``, ``KVView``.
- ``static``: ``StaticKVCache``, pre-allocated, the default of the fast decoder.
- ``paged``: ``PagedKVCache``, blocks from a shared pool (PagedAttention).
- ``hf``: ``HFCache``, a transformers cache for the HF forward.
- ``policies``: eviction under a budget as typed configs and pure keep-functions
  (``Window``, ``Sinks`` = StreamingLLM, ``H2O``); ``evicting``: the caches applying them.
- ``quant``: KIVI quantization of keys and values (``KIVI`` config); ``kivi``: the cache applying it.
- ``compressed``: ``make_kv_cache(spec, policy_or_kivi)`` and ``KVCompressedDecoder``.
"""

from slimlm.generation.kv.compressed import KVCompressedDecoder, make_kv_cache
from slimlm.generation.kv.evicting import EvictingCache, H2OCache, SinkCache
from slimlm.generation.kv.hf import HFCache
from slimlm.generation.kv.kivi import KIVICache
from slimlm.generation.kv.paged import PagedKVCache
from slimlm.generation.kv.policies import H2O, POLICY_NAMES, Policy, Sinks, Window, parse_policy
from slimlm.generation.kv.protocol import CacheSpec, KVCache, KVView, attention_mask
from slimlm.generation.kv.quant import KIVI
from slimlm.generation.kv.static import StaticKVCache

__all__ = ["CacheSpec", "EvictingCache", "H2O", "H2OCache", "HFCache", "KIVI", "KIVICache", "KVCache",
           "KVCompressedDecoder", "KVView", "POLICY_NAMES", "PagedKVCache", "Policy", "SinkCache", "Sinks",
           "StaticKVCache", "Window", "attention_mask", "make_kv_cache", "parse_policy"]
