"""Keep-masks from score tensors: top-k per row, per layer, across layers, and N:M.

Pure functions. A mask is a bool tensor shaped like the weight ``(out, in)``,
True where the weight is kept. The weights with the *lowest* scores are
pruned; the number pruned is exact (:func:`slimlm.prune.patterns.n_pruned`),
ties broken by position, so a pruned matrix has a predictable number of
zeros whatever its values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.errors import SlimlmError
from slimlm.prune.patterns import NM, Pattern, check_fits, n_pruned

SCOPES = ("row", "layer")  # and "global", across matrices (topk_keep_global)


def prune_lowest(flat: Tensor, k: int) -> Tensor:
    """Keep-mask of a 1-D ``flat`` with its ``k`` lowest entries False (ties: earliest first)."""
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return ~keep
    t = flat.kthvalue(k).values  # the k-th smallest score
    below = flat < t
    keep[below] = False
    ties = (flat == t).nonzero().flatten()  # positions of the threshold value, ascending
    keep[ties[: k - int(below.sum())]] = False
    return keep


def topk_keep_per_row(scores: Tensor, sparsity: float) -> Tensor:
    """Prune ``n_pruned(in, sparsity)`` lowest scores in every row of ``scores (out, in)``."""
    k = n_pruned(scores.shape[1], sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores.float(), k, dim=1, largest=False).indices  # (out, k)
        keep.scatter_(1, idx, False)
    return keep


def topk_keep_per_layer(scores: Tensor, sparsity: float) -> Tensor:
    """Prune the ``n_pruned(numel, sparsity)`` lowest scores of the whole matrix."""
    return prune_lowest(scores.float().flatten(), n_pruned(scores.numel(), sparsity)).reshape(scores.shape)


def topk_keep_global(scores: list[Tensor], sparsity: float) -> list[Tensor]:
    """Prune the lowest scores across all matrices together (one threshold for the set).

    Scores must be comparable across matrices (e.g. ``|W|`` of layers of similar scale).
    """
    if not scores:
        raise SlimlmError("global top-k needs at least one score tensor")
    flat = torch.cat([s.float().flatten() for s in scores])  # (sum numel,)
    keep = prune_lowest(flat, n_pruned(flat.numel(), sparsity))
    return [part.reshape(s.shape) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]


def nm_keep(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along each row of ``scores (out, in)``."""
    out_f, in_f = scores.shape
    check_fits(NM(n, m), in_f)
    groups = scores.float().reshape(out_f, in_f // m, m)  # (out, in/m, m)
    idx = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n) kept positions
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(out_f, in_f)


def keep_mask(scores: Tensor, sparsity: float, pattern: Pattern, *, scope: str = "row") -> Tensor:
    """The keep-mask ``pattern`` allows from ``scores (out, in)``: N:M, or top-k per row / per layer."""
    if isinstance(pattern, NM):
        return nm_keep(scores, pattern.n, pattern.m)
    if scope == "row":
        return topk_keep_per_row(scores, sparsity)
    if scope == "layer":
        return topk_keep_per_layer(scores, sparsity)
    raise SlimlmError(f"scope must be one of {', '.join(SCOPES)} here, got {scope!r}")


def is_nm(mask: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive columns of ``mask (out, in)`` keeps exactly ``n``."""
    out_f, in_f = mask.shape
    return in_f % m == 0 and bool((mask.reshape(out_f, in_f // m, m).sum(-1) == n).all())
