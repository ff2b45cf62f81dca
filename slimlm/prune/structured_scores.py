"""Importance passes over calibration data for structured pruning.

Width (Minitron): one block-by-block pass; each block's heads and neurons
are scored from the runner's per-channel sums of squares and the least
important are cut before the block's outputs feed the next one, so every
block is scored on the inputs the pruned model will give it. Depth: ShortGPT
block importance (one pass with a hook per block), or the rise in
calibration NLL when each layer alone is skipped (one pass per layer).
The maths is in :mod:`slimlm.prune.structured`, the cutting in
:mod:`slimlm.prune.surgery`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib.runner import BlockContext, calibrate_blocks
from slimlm.calib.stats import StatsSpec
from slimlm.eval.quality import mean_nll
from slimlm.models.adapters import decoder_blocks, head_layout
from slimlm.prune import structured as S
from slimlm.prune.surgery import mlp_width, prune_attention, prune_mlp, set_width_config

log = logging.getLogger("slimlm.prune")


def prune_width(model: nn.Module, counts: tuple[int, int, int], calib: Tensor, *, batch_size: int = 8) -> nn.Module:
    """Remove (query heads per KV group, whole KV groups, neurons) in every layer, least important first."""
    layout = head_layout(model.config)
    H, KV, D = layout.n_heads, layout.n_kv_heads, layout.head_dim
    n_neurons = mlp_width(model)
    per_group, groups, neurons = counts
    log.info("width pruning per layer: %d query heads per KV group, %d KV groups, %d of %d neurons", per_group, groups,
             neurons, n_neurons)  # fmt: skip

    def on_block(ctx: BlockContext) -> bool:
        if per_group or groups:
            o = ctx.stats[f"{ctx.prefix}.self_attn.o_proj"]
            scores = S.head_importance(S.mean_square(o.sq_sum, o.n), D)  # (H,)
            q_keep, kv_keep = S.select_heads(scores, KV, remove_per_group=per_group, remove_groups=groups)
            prune_attention(ctx.block.self_attn, q_keep, kv_keep, D)
        if neurons:
            d = ctx.stats[f"{ctx.prefix}.mlp.down_proj"]
            keep = S.keep_top(S.neuron_importance(S.mean_square(d.sq_sum, d.n)), n_neurons - neurons)
            prune_mlp(ctx.block.mlp, keep)
        return True

    calibrate_blocks(model, calib, on_block=on_block, spec=StatsSpec(sq_sum=True), batch_size=batch_size,
                     desc="prune width")  # fmt: skip
    n_kv = KV - groups
    set_width_config(model, n_heads=n_kv * (H // KV - per_group), n_kv=n_kv, head_dim=D, n_neurons=n_neurons - neurons)
    return model


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def block_importance_scores(model: nn.Module, calib: Tensor, *, batch_size: int = 8) -> Tensor:
    """(L,) ShortGPT block importance of every decoder layer, from one block-by-block calibration pass."""
    blocks = decoder_blocks(model)
    cos_sum, n_tok = [0.0] * len(blocks), [0] * len(blocks)

    def hook(i: int):
        def fn(_m, args, kwargs, out):
            c = S.cosine_per_token(_hidden_in(args, kwargs), out[0] if isinstance(out, tuple) else out)
            cos_sum[i] += c.double().sum().item()
            n_tok[i] += c.numel()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        calibrate_blocks(model, calib, on_block=lambda _ctx: False, batch_size=batch_size, desc="block importance")
    finally:
        for h in handles:
            h.remove()
    return torch.tensor([S.block_importance(s, n) for s, n in zip(cos_sum, n_tok)])


@torch.no_grad()
def perplexity_scores(model: nn.Module, calib: Tensor, *, samples: int = 8, batch_size: int = 2) -> Tensor:
    """(L,) increase of the calibration NLL (log perplexity) when each layer alone is skipped."""
    blocks = decoder_blocks(model)
    ids = calib[:samples]
    base = mean_nll(model, ids, batch_size)

    def skip(_m, args, kwargs, out):  # the block's output replaced by its input
        x = _hidden_in(args, kwargs)
        return (x, *out[1:]) if isinstance(out, tuple) else x

    scores = []
    for block in tqdm(blocks, desc="layer perplexity", unit="layer", leave=False):
        handle = block.register_forward_hook(skip, with_kwargs=True)
        try:
            scores.append(mean_nll(model, ids, batch_size) - base)
        finally:
            handle.remove()
    return torch.tensor(scores)
