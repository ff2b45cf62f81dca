"""A transformers ``DynamicCache`` behind slimlm's KV-cache protocol, for the HF forward (``HFDecoder``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from slimlm.errors import SlimlmError
from slimlm.generation.kv.protocol import KVView


class HFCache:
    """A transformers ``DynamicCache`` behind the slimlm cache interface (generic path only).

    It keeps the 2D padding mask HF expects; eviction and quantization caches
    need the fast path.
    """

    raw_keys = False

    def __init__(self, model: nn.Module, *, batch: int, max_len: int):
        self.hf = DynamicCache(config=model.config)
        self.batch, self.max_len = batch, max_len
        self.mask2d = torch.zeros(batch, 0, dtype=torch.long, device=next(model.parameters()).device)
        self.rollback = False  # enable_rollback(): crops may reach back past a sliding window

    def enable_rollback(self) -> None:
        """Let ``crop`` roll sliding-window layers back (speculative decoding): transformers then keeps
        their past states until the next crop, and every crop trims them back to the window."""
        self.hf.activate_past_recording()
        self.rollback = True

    @property
    def length(self) -> int:
        return self.mask2d.shape[1]

    def update(self, *args, **kwargs) -> KVView:
        raise SlimlmError("HFCache only serves the HF forward (HFDecoder); it has no per-layer update")

    def wants_scores(self, layer: int) -> bool:
        return False

    def observe(self, layer: int, probs: Tensor) -> None:
        return None

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise SlimlmError(f"cannot crop the KV cache to {length}; it holds {self.length} slots")
        if length < self.length or (self.rollback and length > 0):  # then crop(0) trims sliding layers
            self.hf.crop(length - self.length)  # transformers 5: a negative count of tokens to remove
        self.mask2d = self.mask2d[:, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.hf.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, Tensor))
