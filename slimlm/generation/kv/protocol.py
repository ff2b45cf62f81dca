"""The KV-cache protocol of slimlm's decoder: what a cache is asked and what it hands back.

How the decoder's attention talks to a cache, for layer ``l`` of one forward
over ``T`` new tokens (batch ``B``)::

    q, k, v = projections(x)                  # (B, Hq, T, D), (B, Hkv, T, D) x2
    if cache.raw_keys:                        # the cache places keys itself
        view = cache.update(l, k, v, positions=pos, rope=rope)
        q = rope(q, view.q_positions)
    else:                                     # keys arrive rotated at `pos`
        q, k = rope(q, pos), rope(k, pos)
        view = cache.update(l, k, v, positions=pos, rope=rope)
    if cache.wants_scores(l):                 # eager attention, probabilities handed back
        probs = softmax(q @ view.k^T * scale + mask)        # (B, Hq, T, S), float32
        cache.observe(l, probs)
        out = probs @ view.v
    else:
        out = sdpa(q, view.k, view.v, attn_mask=view.mask, enable_gqa=True)

- ``positions`` (B, T) long: each new token's position in its stream (0 for
  the first prompt token of a row). A negative position marks a padding token
  (left padding in a batch): it is stored but no real query attends to it. At batch 1 a
  single-token step must be a real token (StaticKVCache does not look, so a compiled step
  has no data-dependent branch).
- ``update`` stores the new keys/values (or decides not to: eviction) and
  returns a :class:`KVView`: the keys/values to attend over (float, in the
  query dtype, (B, Hkv, S, D)), a boolean mask (B, 1, T, S) (True = attend,
  None = every query sees every key) and the positions at which to rotate
  the queries. A cache that evicts may return fewer keys than were written,
  a cache that quantizes returns dequantized ones.
- ``raw_keys``: True makes the decoder hand keys *before* rotary together
  with ``rope`` (a :class:`slimlm.generation.rope.Rope`, ``rope(x, pos)``
  rotates ``x`` (B, H, T, D) at ``pos`` (B, T)). Such a cache may rotate
  keys with positions inside the cache (StreamingLLM) and return
  ``q_positions`` to match.
- ``wants_scores(layer)``: True makes the attention compute the softmax
  probabilities explicitly (no SDPA) and pass them to ``observe(layer,
  probs)`` with probs (B, Hq, T, S) over the keys of the returned view
  (H2O's accumulated attention).
- ``crop(length)`` keeps the first ``length`` slots and forgets the rest
  (speculative decoding rolls back rejected draft tokens). ``length`` is the
  number of slots written so far (for one unpadded row: the next position).
- Layers are numbered 0..n-1 in block order and every forward updates layer
  0 first; a cache may prepare per-step state there (StaticKVCache builds
  the mask once per step).

``CacheSpec`` describes the shapes (per layer, so structurally pruned
models with different KV heads per layer fit); ``Decoder.cache_spec()``
gives it, and every cache class is built as ``Cls(spec, batch=B,
max_len=N, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from slimlm.errors import SlimlmError

# rope(x (B, H, T, D), positions (B, T)) -> x rotated at those positions
RopeFn = Callable[[Tensor, Tensor], Tensor]


class KVView(NamedTuple):
    k: Tensor  # (B, Hkv, S, D) keys to attend over, rotated
    v: Tensor  # (B, Hkv, S, D)
    mask: Tensor | None  # (B, 1, T, S) bool, True = attend; None = attend to all S
    q_positions: Tensor  # (B, T) positions at which the queries are rotated


@dataclass(frozen=True)
class CacheSpec:
    kv_heads: tuple[int, ...]  # KV heads of each layer (pruned models may differ per layer)
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    sliding_window: int | None = None  # a key older than this many positions is not attended to

    def __post_init__(self):
        if not self.kv_heads or min(self.kv_heads) < 1 or self.head_dim < 1:
            raise SlimlmError(f"cache spec needs >= 1 layer with >= 1 KV head and head_dim >= 1, got "
                              f"kv_heads={self.kv_heads}, head_dim={self.head_dim}")

    @property
    def n_layers(self) -> int:
        return len(self.kv_heads)

    def bytes_per_token(self, bytes_per_el: float | None = None) -> float:
        """K and V bytes for one token over all layers (2 x sum of KV heads x head dim x bytes)."""
        el = torch.empty((), dtype=self.dtype).element_size() if bytes_per_el is None else bytes_per_el
        return 2 * sum(self.kv_heads) * self.head_dim * el


@runtime_checkable
class KVCache(Protocol):
    raw_keys: bool

    @property
    def length(self) -> int: ...

    def update(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rope: RopeFn) -> KVView: ...

    def wants_scores(self, layer: int) -> bool: ...

    def observe(self, layer: int, probs: Tensor) -> None: ...

    def crop(self, length: int) -> None: ...

    def nbytes(self) -> int: ...


def attention_mask(key_pos: Tensor, q_pos: Tensor, window: int | None = None) -> Tensor:
    """Causal mask from positions: (B, S) key positions (-1 = empty/pad), (B, T) -> (B, 1, T, S) bool.

    A query sees a key when 0 <= key pos <= query pos (and within ``window``).
    Padding queries (negative position) see every stored key, so their
    outputs stay finite; nothing real attends to them.
    """
    kp, qp = key_pos[:, None, :], q_pos[:, :, None]  # (B, 1, S), (B, T, 1)
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    mask |= qp < 0
    return mask[:, None]  # (B, 1, T, S)


def tensor_bytes(*ts) -> int:
    """Bytes held by tensors or packed blocks (anything with an ``nbytes``); None entries count 0."""
    return sum(t.nbytes for t in ts if t is not None)
