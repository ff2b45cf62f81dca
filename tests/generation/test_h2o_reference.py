"""H2OCache against a plain-Python H2O over several KV heads with grouped-query attention.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models". The reference keeps, per layer, batch row and KV head, a list of the tokens it holds in
stream order, each with its raw key, value and accumulated attention (the attention of the G query
heads h with h // G == that KV head, summed over every query so far). When a forward of T tokens
overflows the budget it keeps the last ``recent`` slots (the new tokens among them) and the
``budget - recent`` older tokens with the largest scores (ties to the older one). Attention then
sees the held keys rotated at their in-cache positions 0..S-1 and a causal mask among the new
tokens. Loops and lists only: no gathers, no reshapes that could hide a head mix-up.
"""

import math

import torch

from slimlm.generation.decoder import attend
from slimlm.generation.kv.evicting import H2OCache
from slimlm.generation.kv.policies import H2O
from slimlm.generation.kv.protocol import CacheSpec
from slimlm.generation.rope import Rope

B, D, HQ = 2, 4, 6
KV_HEADS = (2, 3)  # per layer: G = 3 query heads per KV head in layer 0, G = 2 in layer 1
BUDGET, RECENT = 8, 3
# Tokens per forward; ("crop", n) rolls back the n newest slots (a rejected speculative draft).
SCHEDULE = [5, 2, 1, 1, 3, 1, 2, ("crop", 2), 1, 1, 3, 1, 1, 2, 1, 1, 1, 3, 1, 2, 1, 1]


def _rotate(x: list[float], pos: int, rope: Rope) -> list[float]:
    """HF rotary for one vector: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)."""
    half = len(x) // 2
    turned = [-x[i + half] if i < half else x[i - half] for i in range(len(x))]
    cos, sin = rope.cos[pos].tolist(), rope.sin[pos].tolist()
    return [x[i] * cos[i] + turned[i] * sin[i] for i in range(len(x))]


class ReferenceH2O:
    """held[layer][b][h]: list of {"tok", "k", "v", "score"} in stream order."""

    def __init__(self):
        self.held = [[[[] for _ in range(h)] for _ in range(B)] for h in KV_HEADS]

    def update(self, layer: int, toks: list[int], k: list, v: list) -> None:
        """k, v: [b][h][t] -> D floats for the T new tokens ``toks``."""
        T = len(toks)
        for b in range(B):
            for h in range(KV_HEADS[layer]):
                held = self.held[layer][b][h]
                n = len(held)
                if n + T > BUDGET:
                    old = list(range(n + T - RECENT))  # candidates outside the recent window (all old)
                    heavy = sorted(old, key=lambda i: (-held[i]["score"], i))[: BUDGET - RECENT]
                    held[:] = [held[i] for i in sorted(heavy)] + held[n + T - RECENT:]
                held += [{"tok": toks[t], "k": k[b][h][t], "v": v[b][h][t], "score": 0.0} for t in range(T)]

    def attend(self, layer: int, q: list, rope: Rope) -> tuple[list, list]:
        """q: [b][hq][t] -> D floats (raw). Returns outputs [b][hq][t] and probabilities [b][hq][t][s];
        accumulates each probability into the score of the KV head query head hq reads."""
        G = HQ // KV_HEADS[layer]
        out = [[[] for _ in range(HQ)] for _ in range(B)]
        probs = [[[] for _ in range(HQ)] for _ in range(B)]
        for b in range(B):
            for hq in range(HQ):
                held = self.held[layer][b][hq // G]
                S, T = len(held), len(q[b][hq])
                keys = [_rotate(e["k"], s, rope) for s, e in enumerate(held)]
                for t in range(T):
                    qt = _rotate(q[b][hq][t], S - T + t, rope)
                    logit = [sum(a * c for a, c in zip(qt, key)) / math.sqrt(D) if s <= S - T + t else -math.inf
                             for s, key in enumerate(keys)]  # fmt: skip
                    top = max(logit)
                    w = [math.exp(x - top) for x in logit]
                    p = [x / sum(w) for x in w]
                    for s, e in enumerate(held):
                        e["score"] += p[s]
                    out[b][hq].append([sum(p[s] * held[s]["v"][i] for s in range(S)) for i in range(D)])
                    probs[b][hq].append(p)
        return out, probs

    def crop(self, length: int) -> None:
        for layer in self.held:
            for row in layer:
                for held in row:
                    del held[length:]


def _check_view(ref: ReferenceH2O, layer: int, view, T: int, rope: Rope) -> None:
    """The keys (rotated at in-cache positions), values and causal mask attention sees."""
    for b in range(B):
        for h in range(KV_HEADS[layer]):
            held = ref.held[layer][b][h]
            S = len(held)
            keys = torch.tensor([_rotate(e["k"], s, rope) for s, e in enumerate(held)])
            assert torch.allclose(view.k[b, h], keys, atol=1e-5), f"layer {layer} row {b} KV head {h}: keys"
            assert torch.allclose(view.v[b, h], torch.tensor([e["v"] for e in held]), atol=1e-6)
    S = view.k.shape[2]
    mask = torch.ones(B, 1, T, S, dtype=torch.bool) if view.mask is None else view.mask.expand(B, 1, T, S)
    want = torch.tensor([[s <= S - T + t for s in range(S)] for t in range(T)])
    assert torch.equal(mask, want.expand(B, 1, T, S)) and view.q_positions.tolist() == [list(range(S - T, S))] * B


def _check_scores(ref: ReferenceH2O, cache: H2OCache, layer: int) -> None:
    for b in range(B):
        for h in range(KV_HEADS[layer]):
            held = ref.held[layer][b][h]
            got = cache.scores[layer][b, h, : len(held)]
            assert torch.allclose(got, torch.tensor([e["score"] for e in held]), atol=1e-5), \
                f"layer {layer} row {b} KV head {h}: accumulated scores"


def test_h2o_cache_matches_a_plain_python_multi_head_gqa_reference():
    g = torch.Generator().manual_seed(0)
    rope = Rope(torch.randn(BUDGET, D, generator=g), torch.randn(BUDGET, D, generator=g))  # any table will do
    cache = H2OCache(CacheSpec(kv_heads=KV_HEADS, head_dim=D), batch=B, policy=H2O(BUDGET, RECENT))
    ref = ReferenceH2O()
    fed, heads_differ = 0, False
    for step in SCHEDULE:
        if isinstance(step, tuple):
            cache.crop(cache.length - step[1])
            ref.crop(cache.length)
            continue
        toks = list(range(fed, fed + step))
        positions = torch.arange(fed, fed + step).expand(B, step)
        for layer, n_kv in enumerate(KV_HEADS):
            k, v = torch.randn(2, B, n_kv, step, D, generator=g)  # (B, Hkv, T, D) each
            q = torch.randn(B, HQ, step, D, generator=g) * 3  # peaked attention: heads pick different tokens
            view = cache.update(layer, k, v, positions=positions, rope=rope)
            ref.update(layer, toks, k.tolist(), v.tolist())
            _check_view(ref, layer, view, step, rope)
            out = attend(rope(q, view.q_positions), view, scale=D**-0.5, observe=cache.observe, layer=layer)
            ref_out, _ = ref.attend(layer, q.tolist(), rope)
            assert torch.allclose(out, torch.tensor(ref_out), atol=1e-5), f"layer {layer}: attention output"
            _check_scores(ref, cache, layer)
            held = [[e["tok"] for e in ref.held[layer][b][h]] for b in range(B) for h in range(n_kv)]
            heads_differ |= any(x != held[0] for x in held)
        fed += step
    assert cache.length == BUDGET and heads_differ  # eviction ran, and chose differently per head and row
