"""Budgets for ``Structured``: a fraction of the model's parameters -> layers, or heads, groups and neurons.

Depth takes the nearest whole number of layers. Width must stay uniform over
layers (one HF config), so the attention/MLP split is one choice for the
whole model: ``width_candidates`` lists every split that fits the per-layer
budget, ``width_plan`` picks one by a fixed rule, and ``search_width`` prunes
a copy per candidate and keeps the one with the lowest calibration loss
(a light form of Minitron's architecture search, without recovery training).
"""

from __future__ import annotations

import copy
import logging

from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.eval.quality import mean_nll
from slimlm.models.size import unique_params
from slimlm.models.adapters import decoder_blocks, head_layout
from slimlm.prune.structured_config import Structured
from slimlm.prune.structured_scores import prune_width
from slimlm.prune.surgery import mlp_width

log = logging.getLogger("slimlm.prune")

Plan = tuple[int, int, int]  # (query heads removed per KV group, KV groups removed, neurons removed) per layer


def n_params(module: nn.Module) -> int:
    """Parameters of ``module``, shared (tied) ones once."""
    return sum(p.numel() for p in unique_params(module))


def unit_params(block: nn.Module, head_dim: int) -> dict[str, int]:
    """Parameters one query head, one KV head and one MLP neuron hold in ``block`` (biases included)."""
    q, k, o = (block.get_submodule(f"self_attn.{n}") for n in ("q_proj", "k_proj", "o_proj"))
    gate, down = block.get_submodule("mlp.gate_proj"), block.get_submodule("mlp.down_proj")
    return dict(
        head_params=head_dim * (q.in_features + (q.bias is not None) + o.out_features),
        kv_params=2 * head_dim * (k.in_features + (k.bias is not None)),
        neuron_params=2 * (gate.in_features + (gate.bias is not None)) + down.out_features,
    )


def width_candidates(
    target: float, *, n_heads: int, n_kv: int, head_params: int, kv_params: int, neuron_params: int
) -> list[Plan]:
    """Every way to remove about ``target`` parameters per layer. -> [(heads per group, groups, neurons)].

    Attention goes in whole steps that fit in ``target``: k whole KV groups
    (a KV head and its G query heads each), or k query heads from every
    group (when G > 1); MLP neurons (fine steps) make up the rest. Neurons
    may come out at or above the layer's neuron count: callers drop those.
    """
    G = n_heads // n_kv
    plans = []
    for k in range(n_kv):  # k whole groups (k = 0: neurons only)
        plans.append((0, k, k * (G * head_params + kv_params)))
    for k in range(1, G):  # k query heads from every group
        plans.append((k, 0, k * n_kv * head_params))
    return [(h, g, max(0, round((target - r) / neuron_params))) for h, g, r in plans if r <= target]


def width_plan(
    target: float, *, n_heads: int, n_kv: int, head_params: int, kv_params: int, neuron_params: int,
    block_params: int, attention: str = "groups",
) -> Plan:
    """The candidate (see ``width_candidates``) a fixed rule picks. -> (heads per group, groups, neurons).

    ``attention="groups"`` or ``"heads"``: among whole-group (or heads-per-group;
    the same when G = 1) candidates, the one whose share of the attention
    parameters is nearest the share ``target / block_params`` of the block.
    ``"none"``: neurons only.
    """
    G = n_heads // n_kv
    plans = width_candidates(target, n_heads=n_heads, n_kv=n_kv, head_params=head_params, kv_params=kv_params,
                             neuron_params=neuron_params)  # fmt: skip
    if attention == "none":
        return plans[0]
    by_heads = attention == "heads" and G > 1
    plans = [p for p in plans if (p[1] == 0 if by_heads else p[0] == 0)]
    attn_total = n_heads * head_params + n_kv * kv_params

    def attn_share(p: Plan) -> float:
        return (p[0] * n_kv * head_params + p[1] * (G * head_params + kv_params)) / attn_total

    return min(plans, key=lambda p: abs(attn_share(p) - target / block_params))


def depth_budget(model: nn.Module, config: Structured, total: int) -> int:
    """The whole layers nearest ``config.params`` of ``total`` parameters, or a refusal if that is all of them."""
    blocks = decoder_blocks(model)
    L, block_params = len(blocks), n_params(blocks[0])
    n = round(config.params * total / block_params)
    if n >= L:
        most = (L - 1) * block_params / total
        raise SlimlmError(f"params={config.params} would remove {n} of the {L} decoder layers; depth pruning "
                          f"removes at most {most:.1%} of this model (keep one layer); lower params")  # fmt: skip
    return n


def width_budget(model: nn.Module, config: Structured, total: int) -> list[Plan]:
    """The plans that remove about ``config.params`` of ``total`` parameters (one unless ``attention="search"``)."""
    blocks = decoder_blocks(model)
    layout = head_layout(model.config)
    target = config.params * total / len(blocks)  # per layer
    shape = dict(n_heads=layout.n_heads, n_kv=layout.n_kv_heads, **unit_params(blocks[0], layout.head_dim))
    if config.attention == "search":
        plans = width_candidates(target, **shape)
    else:
        plans = [width_plan(target, attention=config.attention, block_params=n_params(blocks[0]), **shape)]
    n_neurons = mlp_width(model)
    plans = [p for p in plans if p[2] < n_neurons]
    if not plans:
        raise SlimlmError(f"params={config.params} needs more MLP neurons per layer than the {n_neurons} there are: "
                          "more than width pruning can take; lower params or use mode: depth")  # fmt: skip
    return plans


def search_width(model: nn.Module, plans: list[Plan], calib: Tensor, *, samples: int, batch_size: int) -> Plan:
    """The plan whose pruned copy of ``model`` has the lowest NLL on the first ``samples`` calibration sequences.

    Widths must be uniform, so the attention/MLP split is one choice for the
    whole model; without recovery training the calibration loss ranks the
    candidates (a light form of Minitron's architecture search).
    """
    if len(plans) == 1:
        return plans[0]
    ids = calib[:samples]
    losses = []
    for plan in tqdm(plans, desc="width search", unit="plan", leave=False):
        trial = prune_width(copy.deepcopy(model), plan, ids, batch_size=batch_size)
        losses.append(mean_nll(trial, ids, min(batch_size, 2)))
        del trial
    log.info("width search (heads per group, groups, neurons) -> calibration NLL: %s",
             {p: round(x, 4) for p, x in zip(plans, losses)})  # fmt: skip
    return plans[min(range(len(plans)), key=losses.__getitem__)]
