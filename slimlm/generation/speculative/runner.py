"""A model behind slimlm's decoder and one KV cache, fed token by token: the target of speculative
decoding, and the engine of every model draft (the ``Runner`` of :mod:`slimlm.generation.speculative.loop`)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.decoder import make_decoder

log = logging.getLogger("slimlm.generation")


class DecoderRunner:
    """A model behind slimlm's decoder (``make_decoder``) and one KV cache: ``feed`` / ``crop`` / ``length``.

    The tokens fed are remembered, so a cache that runs out of room is rebuilt twice as large
    and refilled (the decoders' caches are pre-allocated).
    """

    def __init__(self, model: nn.Module, *, max_len: int = 512, fast: bool | None = None):
        self.decoder = make_decoder(model, fast=fast)
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.cache = self._new_cache()
        self.tokens: list[int] = []

    def _new_cache(self):
        cache = self.decoder.new_cache(1, self.max_len)
        if hasattr(cache, "enable_rollback"):  # HFCache: sliding-window layers must be able to roll back
            cache.enable_rollback()
        return cache

    @property
    def length(self) -> int:
        return len(self.tokens)

    def feed(self, tokens: Tensor, *, n_logits: int | None = None) -> Tensor:
        """(T,) token ids -> (T, V) logits (the last ``n_logits`` rows only, when given), appended to the cache."""
        if self.length + tokens.numel() > self.max_len:
            self._grow(self.length + tokens.numel())
        positions = torch.arange(self.length, self.length + tokens.numel(), device=self.device)  # (T,)
        logits = self.decoder(tokens.to(self.device)[None], positions[None], self.cache, n_logits=n_logits)
        self.tokens += tokens.tolist()
        return logits[0]  # (1, T or n_logits, V) -> (T or n_logits, V)

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise SlimlmError(f"cannot crop to {length} tokens; the cache holds {self.length}")
        self.cache.crop(length)  # also when nothing is removed: a sliding-window cache trims itself then
        del self.tokens[length:]

    def _grow(self, needed: int) -> None:
        kept = torch.tensor(self.tokens, dtype=torch.long)
        self.max_len = max(2 * self.max_len, needed)
        log.debug("KV cache refilled at %d slots", self.max_len)
        self.cache, self.tokens = self._new_cache(), []
        if kept.numel():
            self.feed(kept, n_logits=1)
