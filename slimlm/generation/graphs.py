"""One-token decode steps replayed from a CUDA graph: no Python and no kernel launches per layer.

On a GPU a small model's decode step is launch-bound: the SmolLM2-135M shape
runs ~400 kernels a step, each a few microseconds of work behind a few
microseconds of Python and launch. A CUDA graph records the step's kernels
once and replays them with one call. A graph fixes every shape and address,
so the step must not grow anything: :class:`GraphKVCache` writes each
one-token step at a slot held on the device (advanced by the step itself)
and attends over the whole cache with a mask of the written slots (the
static cache's views grow by one key a step instead).

    step = GraphStep(decoder)
    outs = generate(decoder, [ids], cfg, step=step, cache_fn=step.new_cache)

The first one-token step of each cache runs eagerly (it also runs every
kernel's first-use check) and then records the graph against that cache's
tensors; later steps copy the token and position in and replay. The returned
logits live in the graph's output buffer until the next step. Anything else
(prefill, other caches, CPU, a sliding window) runs the decoder as it is;
a capture that fails is logged once and the steps run eagerly
(``GraphStep.failed`` says why).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.generation.compiled import failure_reason
from slimlm.generation.kv.protocol import CacheSpec, KVView, RopeFn
from slimlm.generation.kv.static import StaticKVCache

log = logging.getLogger("slimlm.generation")


class GraphKVCache(StaticKVCache):
    """A static cache whose one-token steps have fixed shapes: write at ``slot`` (device), attend over all slots.

    Prefill (several tokens) is the static cache's own path. A one-token step writes its keys and values at
    the device-held ``slot``, masks out the slots never written (position -1), and moves ``slot`` on after the
    last layer, on the device, so a replayed graph advances it too. Sliding windows are not supported.
    """

    def __init__(self, spec: CacheSpec, *, batch: int, max_len: int):
        if spec.sliding_window is not None:
            raise SlimlmError("GraphKVCache has no sliding window; decode this model with the static cache")
        super().__init__(spec, batch=batch, max_len=max_len)
        self.slot = torch.zeros(1, dtype=torch.long, device=spec.device)  # where the next one-token step writes
        self._step_mask: Tensor | None = None

    def _begin(self, positions: Tensor) -> None:
        if positions.shape[1] > 1:
            super()._begin(positions)
            self.slot.fill_(self._length)
            return
        if positions.shape[0] != self.batch:
            raise SlimlmError(f"cache was built for batch {self.batch}, got a forward of batch {positions.shape[0]}")
        if self._length + 1 > self.max_len:
            raise SlimlmError(f"KV cache full: {self._length + 1} slots needed, max_len is {self.max_len}; "
                              "build the cache with a larger max_len (prompt + max_new_tokens)")
        self.slot_pos.index_copy_(1, self.slot, positions)
        self._step_mask = (self.slot_pos >= 0)[:, None, None, :]  # (B, 1, 1, max_len)
        self._length += 1  # host bookkeeping; GraphStep keeps it for replays

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope: RopeFn | None = None) -> KVView:
        if positions.shape[1] > 1:
            return super().update(layer, k, v, positions=positions, rope=rope)
        if layer == 0:
            self._begin(positions)
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        if layer == len(self.k) - 1:
            self.slot.add_(1)
        return KVView(self.k[layer], self.v[layer], self._step_mask, positions)

    def crop(self, length: int) -> None:
        super().crop(length)
        self.slot.fill_(length)


class GraphStep:
    """``step(ids (B, 1), positions (B, 1), cache) -> logits``: replayed from a CUDA graph per GraphKVCache."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.failed: str | None = None  # why graphs were given up, if they were
        self._graph: torch.cuda.CUDAGraph | None = None
        self._cache: GraphKVCache | None = None
        self._ids = self._pos = self._out = None

    def new_cache(self, batch: int, max_len: int) -> GraphKVCache:
        return GraphKVCache(self.decoder.cache_spec(), batch=batch, max_len=max_len)

    def __call__(self, ids: Tensor, positions: Tensor, cache: Any, **kw: Any) -> Tensor:
        if (self.failed is not None or kw or ids.shape[1] != 1 or ids.device.type != "cuda"
                or not isinstance(cache, GraphKVCache)):  # fmt: skip
            return self.decoder(ids, positions, cache, **kw)
        if self._cache is not cache or self._ids.shape != ids.shape:
            return self._capture(ids, positions, cache)
        self._ids.copy_(ids)
        self._pos.copy_(positions)
        self._graph.replay()
        cache._length += 1
        return self._out

    def _capture(self, ids: Tensor, positions: Tensor, cache: GraphKVCache) -> Tensor:
        """Run this step eagerly, then record the next ones against ``cache``'s tensors."""
        self._graph = self._cache = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.decoder(ids, positions, cache).clone()  # the real step, and every kernel's first use
        torch.cuda.current_stream().wait_stream(side)
        self._ids, self._pos = ids.clone(), positions.clone()
        length, slot = cache.length, cache.slot.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._out = self.decoder(self._ids, self._pos, cache)
        except Exception as e:  # noqa: BLE001 -- an op that cannot be captured: decode eagerly from here on
            self.failed = failure_reason(e)
            log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", self.failed)
        cache._length = length  # recording runs nothing: the capture's bookkeeping is undone
        cache.slot.copy_(slot)
        if self.failed is None:
            self._graph, self._cache = graph, cache
        return out
