"""SmoothQuant: migrating activation outliers into the weights (Xiao et al. 2023, arXiv:2211.10438).

A few input channels of LLM activations are orders of magnitude larger than
the rest, so one int8 scale per token (or per tensor) wastes almost all of
its range on them. Weights have no such channels. SmoothQuant rescales input
channel j of a linear by a positive ``s_j``:

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T

choosing (eq. 4)

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

from calibration abs-max, so that ``alpha`` of the activation range moves
into the weight (alpha = 0.5 balances them; larger alpha suits models with
stronger outliers). Linears that read the same input (q, k, v; gate, up)
share one ``s`` and ``max|W_j|`` is taken over all their columns.

``diag(s)^-1`` is never applied at run time: it is folded offline into the
operation that produced X, so the float model's function is unchanged:

* a norm ``y = x_hat * (offset + w) + b`` (offset 1 for Gemma's ``(1 + w)``):
  ``w' = (offset + w) / s - offset``, ``b' = b / s``;
* a linear whose output channel j *is* input channel j (up_proj before the
  elementwise gate product, fc1 before a ReLU, v_proj before attention, which
  mixes tokens but not channels): divide its row j (and bias) by ``s_j``.

Only pure tensor functions live here; the folding is :mod:`slimlm.quant.fold`
(shared with AWQ) and ``slimlm.quant.w8a8`` applies both.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def smoothing_scales(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """``s (in,) = max|X_j|^alpha / max|W_j|^(1-alpha)``; 1 for a channel whose X or W is all zero."""
    ax, aw = x_absmax.float(), w_absmax.float()
    s = ax.pow(alpha) / aw.pow(1.0 - alpha)
    ok = (ax > 0) & (aw > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5)


@torch.no_grad()
def weight_absmax(Ws: list[Tensor]) -> Tensor:
    """``max_i |W_ij|`` over the rows of every ``W (out_k, in)`` sharing the input -> ``(in,)``."""
    return torch.stack([W.detach().float().abs().amax(0) for W in Ws]).amax(0)


@torch.no_grad()
def grouped_head_scales(x_absmax: Tensor, w_absmax: Tensor, alpha: float, *, n_heads: int, n_kv_heads: int,
                        head_dim: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Scales for the o_proj input (``n_heads * head_dim`` channels) that v_proj rows can absorb.

    With grouped-query attention, query head h reads kv head ``h // (n_heads / n_kv_heads)``, so
    channel (h, d) of the attention output is channel (kv, d) of V scaled by attention weights:
    ``s`` must be equal across the heads sharing a kv head. -> ``(s_o (n_heads*hd,), s_v (n_kv*hd,))``.
    """
    rep = n_heads // n_kv_heads
    ax = x_absmax.float().reshape(n_kv_heads, rep, head_dim).amax(1)  # (kv, hd)
    aw = w_absmax.float().reshape(n_kv_heads, rep, head_dim).amax(1)  # (kv, hd)
    s_v = smoothing_scales(ax, aw, alpha)  # (kv, hd)
    s_o = s_v[:, None, :].expand(n_kv_heads, rep, head_dim).reshape(-1)  # (heads * hd,)
    return s_o, s_v.reshape(-1)
