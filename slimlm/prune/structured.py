"""Structured pruning: importance scores and the index arithmetic that removes heads, neurons and layers.

Width importance follows Minitron (Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation"): on calibration data, the
importance of attention head h is the mean over tokens of the squared L2 norm
of its attention output (the input of o_proj, columns h*D .. h*D+D-1), and the
importance of MLP neuron j is the mean square of the intermediate activation
act(gate_j) * up_j (input column j of down_proj). Both are read from the
per-channel sums of squares the calibration runner already gathers.

Depth importance follows ShortGPT (Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect"): the block
importance of layer i is BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)], one minus the
mean cosine similarity of the block's input and output hidden states over
tokens. A block that barely turns its input is the cheapest to drop.

Removal keeps grouped-query attention intact: query head h reads KV head
h // G (G = query heads per KV group, the order ``repeat_kv`` expands), so
either every group keeps the same number of query heads, or whole groups
(a KV head with all its query heads) go. Everything here is a pure function
of tensors: no modules, hooks or I/O. The passes that gather the
statistics are in :mod:`slimlm.prune.structured_scores`, the module
surgery in :mod:`slimlm.prune.surgery`, budgets in
:mod:`slimlm.prune.structured_search`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_square(sq_sum: Tensor, n: int) -> Tensor:
    """Per-channel mean of x^2 over ``n`` tokens, from the runner's running sum of squares."""
    return sq_sum.float() / max(n, 1)


def head_importance(channel_ms: Tensor, head_dim: int) -> Tensor:
    """(H*D,) mean square per o_proj input channel -> (H,) mean ||head output||^2 per head."""
    return channel_ms.reshape(-1, head_dim).sum(-1)  # (H, D) -> (H,)


def neuron_importance(channel_ms: Tensor) -> Tensor:
    """(I,) mean square per down_proj input channel = mean (act(gate_j) * up_j)^2: the neuron's score."""
    return channel_ms.float()


def cosine_per_token(x_in: Tensor, x_out: Tensor) -> Tensor:
    """(..., hidden) block input and output -> (tokens,) cosine similarity per token, in float32."""
    a = x_in.reshape(-1, x_in.shape[-1]).float()  # (tokens, hidden)
    b = x_out.reshape(-1, x_out.shape[-1]).float()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)


def block_importance(cos_sum: float, n_tokens: int) -> float:
    """ShortGPT's BI = 1 - mean cosine(input, output) over the calibration tokens."""
    return 1.0 - cos_sum / max(n_tokens, 1)


def keep_top(scores: Tensor, n_keep: int) -> Tensor:
    """Ascending indices of the ``n_keep`` highest scores (ties: the lower index wins).

    Indices stay in their original order so kept heads/neurons keep their
    relative positions (rotary and GQA layouts depend on it only through
    the head index arithmetic, but sorted indices make slicing reproducible).
    """
    if not 0 <= n_keep <= scores.numel():
        raise ValueError(f"n_keep {n_keep} outside [0, {scores.numel()}]")
    # stable sort on -score: equal scores keep index order
    order = torch.sort(-scores.float(), stable=True).indices
    return order[:n_keep].sort().values


def drop_lowest(scores: Tensor, n_drop: int) -> list[int]:
    """Ascending indices of the ``n_drop`` lowest scores (ties: the higher index goes first)."""
    keep = keep_top(scores, scores.numel() - n_drop)
    kept = set(keep.tolist())
    return [i for i in range(scores.numel()) if i not in kept]


def select_heads(
    scores: Tensor, n_kv: int, *, remove_per_group: int = 0, remove_groups: int = 0
) -> tuple[Tensor, Tensor]:
    """Which query and KV heads stay. -> (q_keep (H',), kv_keep (KV',)), ascending.

    ``scores`` (H,) per query head. Either each KV group drops its
    ``remove_per_group`` least important query heads (every group keeps
    G - remove_per_group), or the ``remove_groups`` groups with the lowest
    summed score go whole (their KV head with all their query heads).
    """
    H = scores.numel()
    G = H // n_kv
    if H % n_kv:
        raise ValueError(f"{H} query heads do not split into {n_kv} KV groups")
    if not 0 <= remove_per_group < G or not 0 <= remove_groups < n_kv:
        raise ValueError(f"cannot remove {remove_per_group} heads per group of {G} and {remove_groups} of {n_kv} groups")
    by_group = scores.float().reshape(n_kv, G)  # (KV, G): row j holds query heads j*G .. j*G+G-1
    kv_keep = keep_top(by_group.sum(-1), n_kv - remove_groups)  # (KV',)
    per_group = [keep_top(by_group[j], G - remove_per_group) + j * G for j in kv_keep.tolist()]
    return torch.cat(per_group), kv_keep


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """(h,) head indices -> (h*D,) row indices of a projection laid out (head, head_dim)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)  # (h, D) -> (h*D,)


def slice_rows(W: Tensor, b: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor | None]:
    """Keep output rows ``rows`` of a linear weight (out, in) and its bias (out,)."""
    rows = rows.to(W.device)
    return W.index_select(0, rows).contiguous(), None if b is None else b.index_select(0, rows).contiguous()


def slice_cols(W: Tensor, cols: Tensor) -> Tensor:
    """Keep input columns ``cols`` of a linear weight (out, in); the bias (out,) is unchanged."""
    return W.index_select(1, cols.to(W.device)).contiguous()

