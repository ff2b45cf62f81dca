"""Structured pruning handlers: a genuinely smaller dense model.

``PruneWidth`` removes attention heads (keeping grouped-query attention
intact) and MLP neurons, ``PruneDepth`` removes whole decoder layers, and
``Structured`` picks the counts that remove a fraction of the model's total
parameters. The pieces, one concern a file:

- :mod:`slimlm.prune.structured_config`: the three configs and their checks
- :mod:`slimlm.prune.structured`: importance maths and index arithmetic (pure tensors)
- :mod:`slimlm.prune.structured_scores`: the calibration passes (width pruning, layer scores)
- :mod:`slimlm.prune.surgery`: slicing linears, dropping layers, updating ``model.config``
- :mod:`slimlm.prune.structured_search`: parameter budgets and the attention/MLP split

Widths stay uniform across layers (an HF config holds one
``num_attention_heads`` and one ``intermediate_size``), so the pruned model
loads with stock transformers: every layer removes the same number of heads
and neurons, and importance decides which ones, layer by layer.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import decoder_blocks, head_layout
from slimlm.prune.structured import drop_lowest
from slimlm.prune.structured_config import PruneDepth, PruneWidth, Structured, count, width_counts
from slimlm.prune.structured_scores import block_importance_scores, perplexity_scores, prune_width
from slimlm.prune.structured_search import depth_budget, n_params, search_width, width_budget
from slimlm.prune.surgery import check_model, mlp_width, remove_layers
from slimlm.validate import check_calib

log = logging.getLogger("slimlm.prune")

__all__ = ["PruneDepth", "PruneWidth", "Structured", "apply_prune_depth", "apply_prune_width", "apply_structured"]

_PURPOSE = "for importance"


def apply_prune_width(model: nn.Module, config: PruneWidth, calib: Tensor | None = None) -> nn.Module:
    check_model(model)
    check_calib(calib, "PruneWidth", purpose=_PURPOSE)
    layout = head_layout(model.config)
    n_neurons = mlp_width(model)
    counts = width_counts(config, layout.n_heads, layout.n_kv_heads, n_neurons)
    if not any(counts):
        log.warning("%s removes nothing on this model (%d heads, %d KV groups, %d neurons per layer)", config,
                    layout.n_heads, layout.n_kv_heads, n_neurons)  # fmt: skip
        return model
    return prune_width(model, counts, calib, batch_size=config.batch_size)


def apply_prune_depth(model: nn.Module, config: PruneDepth, calib: Tensor | None = None) -> nn.Module:
    check_model(model)
    check_calib(calib, "PruneDepth", purpose=_PURPOSE)
    L = len(decoder_blocks(model))
    n = count(config.layers, L)
    if n >= L:
        raise SlimlmError(f"layers={config.layers!r} removes {n} of the {L} decoder layers; keep at least one "
                          f"(valid: 0..{L - 1}, or a fraction in [0, 1))")  # fmt: skip
    if n == 0:
        log.warning("%s removes no layer of %d", config, L)
        return model
    if config.metric == "block_importance":
        scores = block_importance_scores(model, calib, batch_size=config.batch_size)
    else:
        scores = perplexity_scores(model, calib, samples=config.ppl_samples, batch_size=min(config.batch_size, 2))
    drop = drop_lowest(scores, n)
    log.info("depth pruning: %s per layer %s; dropping layers %s", config.metric,
             [round(s, 4) for s in scores.tolist()], drop)  # fmt: skip
    return remove_layers(model, drop)


def apply_structured(model: nn.Module, config: Structured, calib: Tensor | None = None) -> nn.Module:
    check_model(model)
    check_calib(calib, "Structured", purpose=_PURPOSE)
    total = n_params(model)
    if config.mode == "depth":
        layers = depth_budget(model, config, total)
        step = PruneDepth(layers=layers, metric=config.metric, ppl_samples=config.ppl_samples,
                          batch_size=config.batch_size)  # fmt: skip
        model = apply_prune_depth(model, step, calib)
    else:
        plans = width_budget(model, config, total)
        counts = search_width(model, plans, calib, samples=config.search_samples, batch_size=config.batch_size)
        model = prune_width(model, counts, calib, batch_size=config.batch_size)
    after = n_params(model)
    log.info("%s: %d -> %d parameters (%.1f%% removed, target %.1f%%)", config, total, after,
             100 * (1 - after / total), 100 * config.params)  # fmt: skip
    return model
