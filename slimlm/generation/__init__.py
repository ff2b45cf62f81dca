"""Text generation: slimlm's decode loop over a KV-cache protocol, paged and compressed caches,
speculative decoding, streaming.

    dec = make_decoder(model)                     # lean llama-like forward, or the HF forward
    outs = generate(dec, [ids], GenerationConfig(max_new_tokens=64))
    outs = generate(dec, [ids], cfg, step=compile_step(dec))  # one-token steps under torch.compile

Layout: ``decoder`` (the forwards), ``loop`` (prefill + steps), ``compiled`` (the compiled step),
``sampling``, ``rope``, ``stream``
(text pieces); ``kv/`` (the cache protocol and every cache); ``speculative/`` (verify loop, adaptive
k, drafts). Generation imports only the layers below it (models, kernels, formats), never compression.
"""

from slimlm.generation.compiled import CompiledStep, compile_step
from slimlm.generation.decoder import FastDecoder, HFDecoder, make_decoder
from slimlm.generation.kv import CacheSpec, KVCache, KVView, PagedKVCache, StaticKVCache
from slimlm.generation.loop import GenerationConfig, generate, stream_text, stream_tokens
from slimlm.generation.sampling import Sampling
from slimlm.generation.stream import generate_text

__all__ = ["CacheSpec", "CompiledStep", "FastDecoder", "GenerationConfig", "HFDecoder", "KVCache", "KVView",
           "PagedKVCache", "Sampling", "StaticKVCache", "compile_step", "generate", "generate_text", "make_decoder", "stream_text",
           "stream_tokens"]
