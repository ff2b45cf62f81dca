"""Perplexity, KL divergence to the base model, and top-1 agreement.

Each window of T tokens is scored on its own: positions 0..T-2 predict
tokens 1..T-1, so a window yields T-1 token-level negative log-likelihoods.
Perplexity is exp of the mean NLL over every scored token of every window.

A window that starts with BOS (a tokenizer that adds it, see
``slimlm.data.tokens``) is scored the same way: BOS at position 0 is never a
target, and its prediction of the first text token is scored, so every text
token of the window counts (as in lm-eval's rolling windows and HF's
``labels=window`` loss; llama.cpp scores only each window's second half).
NLL, KL and top-1 agreement all read the same (T-1, V) log-probabilities, so
they cover exactly the same positions.

KL(p_base || q) per position is computed from the base model's top-k
log-probabilities plus one "tail" bucket holding the rest of its mass:

    KL ~= sum_{i in topk} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

Merging outcomes into a bucket never increases KL (data processing), so this
is a lower bound that is exact when k covers the vocabulary, and it lets the
base outputs be cached on disk in megabytes rather than gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

_TINY = 1e-12


@dataclass(frozen=True)
class BaseStats:
    """The base model's reference outputs on a protocol's windows."""

    topk_idx: torch.Tensor  # (W, T-1, k) int32 token ids, most likely first
    topk_logp: torch.Tensor  # (W, T-1, k) float32 log-probabilities
    nll: torch.Tensor  # (W,) float64 mean NLL per window

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean().item())


@dataclass(frozen=True)
class Quality:
    perplexity: float
    nll: float  # mean token NLL in nats
    kld: float | None  # mean KL(p_base || p_model) per token, nats
    top1_agreement: float | None  # fraction of positions where argmax matches the base
    tokens: int  # tokens in the scored windows
    windows: int
    window: int


@torch.inference_mode()
def window_logprobs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of one window. (T,) token ids -> (T-1, V) float32."""
    device = next(model.parameters()).device
    logits = model(input_ids=window.unsqueeze(0).to(device), use_cache=False).logits  # (1, T, V)
    return F.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V)


def token_nll(logp: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(T-1, V) log-probs, (T,) ids -> (T-1,) NLL of each next token."""
    target = window[1:].to(logp.device).long()  # (T-1,)
    return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def kl_to_base(logq: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_base || q) from the base's top-k plus a tail bucket.

    logq (P, V) float32, topk_idx (P, k) int, topk_logp (P, k) -> (P,) float32.
    """
    logq_k = logq.gather(-1, topk_idx.long())  # (P, k)
    p_k = topk_logp.exp()
    head = (p_k * (topk_logp - logq_k)).sum(-1)  # (P,)
    p_tail = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - logq_k.exp().sum(-1)).clamp_min(_TINY)
    tail = torch.where(p_tail > _TINY, p_tail * (p_tail.clamp_min(_TINY).log() - q_tail.log()), 0.0)
    return (head + tail).clamp_min(0.0)


def score_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    base: BaseStats | None = None,
    collect_top_k: int | None = None,
    desc: str = "perplexity",
) -> tuple[Quality, BaseStats | None]:
    """Score (W, T) windows; compare with ``base`` when given.

    With ``collect_top_k`` the model's own top-k outputs are returned as a
    BaseStats, so a base model is scored and cached in one pass. KL and top-1
    agreement are then measured against those (0 and 1 for the model itself).
    """
    n_win, T = windows.shape
    nlls, kls, agree = [], [], []
    idx_rows, logp_rows = [], []
    for w in tqdm(range(n_win), desc=desc, unit="win", leave=False):
        logp = window_logprobs(model, windows[w])  # (T-1, V)
        nll = token_nll(logp, windows[w])
        nlls.append(nll.double().mean().cpu())
        if collect_top_k is not None:
            k = min(collect_top_k, logp.shape[-1])
            top_logp, top_idx = logp.topk(k, dim=-1)  # (T-1, k)
            idx_rows.append(top_idx.int().cpu())
            logp_rows.append(top_logp.cpu())
        ref_idx = base.topk_idx[w] if base is not None else (idx_rows[-1] if idx_rows else None)
        ref_logp = base.topk_logp[w] if base is not None else (logp_rows[-1] if logp_rows else None)
        if ref_idx is not None:
            ref_idx, ref_logp = ref_idx.to(logp.device), ref_logp.to(logp.device)
            kls.append(kl_to_base(logp, ref_idx, ref_logp).double().mean().cpu())
            agree.append((logp.argmax(-1) == ref_idx[:, 0].long()).double().mean().cpu())
    nll_w = torch.stack(nlls)  # (W,)
    mean_nll = nll_w.mean().item()  # windows have equal length, so this is the token mean
    quality = Quality(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        kld=torch.stack(kls).mean().item() if kls else None,
        top1_agreement=torch.stack(agree).mean().item() if agree else None,
        tokens=n_win * T,
        windows=n_win,
        window=T,
    )
    collected = None
    if collect_top_k is not None:
        collected = BaseStats(torch.stack(idx_rows), torch.stack(logp_rows), nll_w)
    return quality, collected


@torch.no_grad()
def mean_nll(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of (N, L) token ids, scored ``batch_size`` sequences per forward.

    The model's own loss (``labels=ids``) per batch, weighted by the batch's
    sequences: with equal-length sequences that is the mean over all N*(L-1)
    predicted tokens. A cheap, batched score for ranking model variants on
    calibration data; the protocol's perplexity is ``score_windows``.
    """
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)  # (B, L)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * batch.shape[0]
    return total / ids.shape[0]
