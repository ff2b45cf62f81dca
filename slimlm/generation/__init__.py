"""Text generation: slimlm's decode loop over a KV-cache protocol, paged caches, streaming.

    dec = make_decoder(model)                     # lean llama-like forward, or the HF forward
    outs = generate(dec, [ids], GenerationConfig(max_new_tokens=64))
"""

from slimlm.generation.cache import CacheSpec, KVCache, KVView, StaticKVCache
from slimlm.generation.decoder import FastDecoder, HFDecoder, make_decoder
from slimlm.generation.loop import GenerationConfig, generate, stream_text, stream_tokens
from slimlm.generation.paged import PagedKVCache
from slimlm.generation.sampling import Sampling
from slimlm.generation.stream import generate_text

__all__ = ["CacheSpec", "FastDecoder", "GenerationConfig", "HFDecoder", "KVCache", "KVView", "PagedKVCache",
           "Sampling", "StaticKVCache", "generate", "generate_text", "make_decoder", "stream_text",
           "stream_tokens"]
