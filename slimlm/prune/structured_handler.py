"""Structured pruning configs and handlers: a genuinely smaller dense model.

``PruneWidth`` removes attention heads (keeping grouped-query attention
intact) and MLP neurons, ``PruneDepth`` removes whole decoder layers, and
``Structured`` picks the counts that remove a fraction of the model's total
parameters. Importance scores and index arithmetic live in
:mod:`slimlm.prune.structured`; this file gathers calibration statistics,
slices the linears and updates ``model.config``.

Widths stay uniform across layers (an HF config holds one
``num_attention_heads`` and one ``intermediate_size``), so the pruned model
loads with stock transformers: every layer removes the same number of heads
and neurons, and importance decides which ones, layer by layer.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib import BlockContext, StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.models.adapters import ADAPTERS, Adapter, decoder_blocks, get_adapter, head_layout, text_config
from slimlm.prune import structured as S
from slimlm.targets import Targets, replace_module

log = logging.getLogger("slimlm.prune")

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Families whose blocks have separate q/k/v/o and gate/up/down linears (read from the adapter table).
SUPPORTED = tuple(f for f, a in ADAPTERS.items() if not a.fused and set(a.linear_names()) == {*_ATTN, *_MLP})
METRICS = ("block_importance", "perplexity")
MODES = ("width", "depth")


def _check_amount(name: str, value: object, of: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SlimlmError(f"{name} must be a count (int >= 0) or a fraction in [0, 1) of {of}, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise SlimlmError(f"{name}={value} is a fraction outside [0, 1) of {of}; give a fraction in [0, 1) "
                          "or an int count")  # fmt: skip
    if isinstance(value, int) and value < 0:
        raise SlimlmError(f"{name}={value} must be >= 0 (a count) or a fraction in [0, 1) of {of}")


def _count(value: int | float, total: int) -> int:
    return value if isinstance(value, int) else round(value * total)


def _check_common(cfg) -> None:
    if cfg.targets != Targets():
        raise SlimlmError(f"{type(cfg).__name__} prunes every decoder block alike (uniform widths); "
                          "include/exclude/lm_head are not supported")  # fmt: skip
    _check_pos_int("batch_size", cfg.batch_size, "calibration sequences per forward")


def _check_pos_int(name: str, value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlimlmError(f"{name} must be a positive int ({what}), got {value!r}")


def _check_depth_fields(cfg) -> None:
    if cfg.metric not in METRICS:
        raise SlimlmError(f"metric {cfg.metric!r} is unknown; valid: {', '.join(METRICS)}")
    _check_pos_int("ppl_samples", cfg.ppl_samples, "calibration sequences scored per dropped layer")


@dataclass(frozen=True)
class PruneWidth:
    """Remove attention heads and MLP neurons, the same number in every layer (Minitron importance).

    Each amount is an int count per layer or a float fraction in [0, 1) of
    the layer's units. ``heads``: query heads, spread evenly over the KV
    groups (each group keeps the same number); ``groups``: whole KV groups,
    each a KV head with all its query heads; give one or the other.
    ``neurons``: MLP intermediate channels.
    """

    needs_calibration: ClassVar[bool] = True

    heads: int | float = 0
    groups: int | float = 0
    neurons: int | float = 0
    batch_size: int = 8
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _check_amount("heads", self.heads, "the query heads")
        _check_amount("groups", self.groups, "the KV groups")
        _check_amount("neurons", self.neurons, "the MLP neurons")
        if self.heads and self.groups:
            raise SlimlmError("give heads (query heads spread over the KV groups) or groups (whole KV groups), not both")
        _check_common(self)


@dataclass(frozen=True)
class PruneDepth:
    """Remove ``layers`` whole decoder layers (an int count or a fraction in [0, 1) of them).

    ``metric``: ``block_importance`` (ShortGPT, 1 - cos(input, output) per
    block, one calibration pass) or ``perplexity`` (calibration loss with the
    layer skipped, on the first ``ppl_samples`` sequences, one pass per
    layer). The layers with the lowest scores go.
    """

    needs_calibration: ClassVar[bool] = True

    layers: int | float = 0
    metric: str = "block_importance"
    ppl_samples: int = 8
    batch_size: int = 8
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        _check_amount("layers", self.layers, "the decoder layers")
        _check_depth_fields(self)
        _check_common(self)


@dataclass(frozen=True)
class Structured:
    """Remove about ``params`` (a fraction in [0, 1)) of the model's TOTAL parameters.

    The total counts every parameter once, so a tied embedding / lm_head
    counts once; embeddings and norms are never removed, so the reachable
    fraction is below 1. ``mode="depth"``: the nearest whole number of
    layers (``metric``, ``ppl_samples`` as in PruneDepth). ``mode="width"``:
    attention in whole steps (KV groups, or query heads from every group),
    MLP neurons for the rest. ``attention`` picks the split:
    ``search`` (default) prunes a copy per candidate split on the first
    ``search_samples`` calibration sequences and keeps the one with the
    lowest calibration loss (one extra pruning pass per candidate);
    ``groups`` / ``heads``: the whole-group / heads-per-group step count
    nearest the budget's share of the block; ``none``: neurons only.
    """

    needs_calibration: ClassVar[bool] = True

    params: float = 0.25
    mode: str = "width"
    attention: str = "search"
    search_samples: int = 8
    metric: str = "block_importance"
    ppl_samples: int = 8
    batch_size: int = 8
    targets: Targets = field(default_factory=Targets)

    def __post_init__(self) -> None:
        p = self.params
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise SlimlmError(f"params must be a fraction in [0, 1) of the model's parameters, got {p!r}")
        if self.mode not in MODES:
            raise SlimlmError(f"mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if self.attention not in S.ATTENTION_STEPS:
            raise SlimlmError(f"attention {self.attention!r} is unknown; valid: {', '.join(S.ATTENTION_STEPS)}")
        _check_pos_int("search_samples", self.search_samples, "calibration sequences per candidate split")
        _check_depth_fields(self)
        _check_common(self)


def check_model(model: nn.Module) -> Adapter:
    """The model's adapter, if structured pruning supports its family and its linears are float."""
    adapter = get_adapter(model)
    if adapter.family not in SUPPORTED:
        raise SlimlmError(f"structured pruning does not support model type {adapter.family!r}; "
                          f"supported: {', '.join(SUPPORTED)}")  # fmt: skip
    for i, block in enumerate(decoder_blocks(model)):
        for rel in (*_ATTN, *_MLP):
            m = block.get_submodule(rel)
            if type(m) is not nn.Linear:
                raise SlimlmError(f"{adapter.blocks}.{i}.{rel} is a {type(m).__name__}: structured pruning needs "
                                  "float nn.Linear weights; prune before quantizing")  # fmt: skip
    return adapter


def _check_calib(calib: object, name: str) -> None:
    if calib is None:
        raise SlimlmError(f"{name} needs calibration token ids (N, L) for importance; pass calib=calibration_ids(...) "
                          "or use a recipe through `slimlm compress`, which provides them")  # fmt: skip
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise SlimlmError(f"calib must be a non-empty (N, L) tensor of token ids, got {type(calib).__name__}")


def _slice_linear(parent: nn.Module, name: str, *, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Replace the nn.Linear ``parent.name`` by one keeping output ``rows`` (and bias) or input ``cols``."""
    old = getattr(parent, name)
    W, b = old.weight.data, None if old.bias is None else old.bias.data
    if rows is not None:
        W, b = S.slice_rows(W, b, rows)
    if cols is not None:
        W = S.slice_cols(W, cols)
    new = nn.utils.skip_init(nn.Linear, W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    new.weight = nn.Parameter(W, requires_grad=old.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=old.bias.requires_grad)
    setattr(parent, name, new)


def prune_attention(attn: nn.Module, q_keep: Tensor, kv_keep: Tensor, head_dim: int) -> None:
    """Keep query heads ``q_keep`` and KV heads ``kv_keep`` of a llama-style attention module."""
    q_rows, kv_rows = S.head_rows(q_keep, head_dim), S.head_rows(kv_keep, head_dim)
    _slice_linear(attn, "q_proj", rows=q_rows)
    _slice_linear(attn, "k_proj", rows=kv_rows)
    _slice_linear(attn, "v_proj", rows=kv_rows)
    _slice_linear(attn, "o_proj", cols=q_rows)
    # eager and SDPA attention repeat each KV head num_key_value_groups times
    attn.num_key_value_groups = len(q_keep) // len(kv_keep)
    for attr, value in (("num_heads", len(q_keep)), ("num_key_value_heads", len(kv_keep))):
        if hasattr(attn, attr):
            setattr(attn, attr, value)


def prune_mlp(mlp: nn.Module, keep: Tensor) -> None:
    """Keep intermediate channels ``keep`` of a gated MLP: gate/up rows and down columns."""
    _slice_linear(mlp, "gate_proj", rows=keep)
    _slice_linear(mlp, "up_proj", rows=keep)
    _slice_linear(mlp, "down_proj", cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def width_counts(config: PruneWidth, n_heads: int, n_kv: int, n_neurons: int) -> tuple[int, int, int]:
    """-> (query heads removed per KV group, KV groups removed, neurons removed) per layer, or a refusal."""
    G = n_heads // n_kv
    heads, groups, neurons = _count(config.heads, n_heads), _count(config.groups, n_kv), _count(config.neurons, n_neurons)
    if G == 1:  # one query head per group: removing a head removes its group
        per_group, groups = 0, max(heads, groups)
    elif isinstance(config.heads, float):
        per_group = round(config.heads * G)
    elif heads % n_kv:
        valid = ", ".join(str(k * n_kv) for k in range(G))
        raise SlimlmError(f"heads={heads} does not split evenly over the {n_kv} KV groups (each keeps the same "
                          f"number of query heads); valid: {valid}")  # fmt: skip
    else:
        per_group = heads // n_kv
    if per_group >= G:
        raise SlimlmError(f"heads={config.heads!r} removes {per_group} query heads from each KV group, but a group holds "
                          f"only {G}; remove at most {G - 1} per group, or whole groups with groups=N")  # fmt: skip
    if groups >= n_kv:
        raise SlimlmError(f"groups={config.groups!r} removes {groups} of the {n_kv} KV groups per layer; "
                          f"keep at least one (valid: 0..{n_kv - 1})")  # fmt: skip
    if neurons >= n_neurons:
        raise SlimlmError(f"neurons={config.neurons!r} removes {neurons} of the {n_neurons} MLP neurons per layer; "
                          f"keep at least one (valid: 0..{n_neurons - 1})")  # fmt: skip
    return per_group, groups, neurons


def _set_width_config(model: nn.Module, adapter: Adapter, *, n_heads: int, n_kv: int, head_dim: int,
                      n_neurons: int) -> None:  # fmt: skip
    cfg = text_config(model.config, adapter)
    setattr(cfg, adapter.n_heads_attr, n_heads)
    setattr(cfg, adapter.n_kv_heads_attr, n_kv)
    cfg.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer gives it
    cfg.intermediate_size = n_neurons


def apply_prune_width(model: nn.Module, config: PruneWidth, calib: Tensor | None = None) -> nn.Module:
    check_model(model)
    _check_calib(calib, "PruneWidth")
    layout = head_layout(model.config)
    n_neurons = decoder_blocks(model)[0].get_submodule("mlp.down_proj").in_features
    counts = width_counts(config, layout.n_heads, layout.n_kv_heads, n_neurons)
    if not any(counts):
        log.warning("%s removes nothing on this model (%d heads, %d KV groups, %d neurons per layer)", config,
                    layout.n_heads, layout.n_kv_heads, n_neurons)  # fmt: skip
        return model
    return prune_width(model, counts, calib, batch_size=config.batch_size)


def prune_width(model: nn.Module, counts: tuple[int, int, int], calib: Tensor, *, batch_size: int = 8) -> nn.Module:
    """Remove (query heads per KV group, whole KV groups, neurons) in every layer, least important first."""
    adapter = get_adapter(model)
    layout = head_layout(model.config)
    H, KV, D = layout.n_heads, layout.n_kv_heads, layout.head_dim
    n_neurons = decoder_blocks(model)[0].get_submodule("mlp.down_proj").in_features
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
    _set_width_config(model, adapter, n_heads=n_kv * (H // KV - per_group), n_kv=n_kv, head_dim=D,
                      n_neurons=n_neurons - neurons)  # fmt: skip
    return model


def remove_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove decoder layers ``drop`` (indices) in place; renumber the rest and update the config."""
    adapter = get_adapter(model)
    blocks = decoder_blocks(model)
    L = len(blocks)
    gone = set(drop)
    if len(gone) != len(drop) or not gone <= set(range(L)):
        raise SlimlmError(f"layers to drop {sorted(drop)} must be distinct indices in 0..{L - 1}")
    if len(gone) >= L:
        raise SlimlmError(f"dropping {len(gone)} of {L} decoder layers removes them all; keep at least one")
    kept = [b for i, b in enumerate(blocks) if i not in gone]
    for new_idx, block in enumerate(kept):
        for m in block.modules():  # attention modules index the KV cache by layer_idx
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    replace_module(model, adapter.blocks, nn.ModuleList(kept))
    cfg = text_config(model.config, adapter)
    setattr(cfg, adapter.n_layers_attr, len(kept))
    if getattr(cfg, "layer_types", None) is not None:  # per-layer attention kinds (sliding / full)
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in gone]
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
def _mean_nll(model: nn.Module, ids: Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * batch.shape[0]
    return total / ids.shape[0]


@torch.no_grad()
def perplexity_scores(model: nn.Module, calib: Tensor, *, samples: int = 8, batch_size: int = 2) -> Tensor:
    """(L,) increase of the calibration NLL (log perplexity) when each layer alone is skipped."""
    blocks = decoder_blocks(model)
    ids = calib[:samples]
    base = _mean_nll(model, ids, batch_size)

    def skip(_m, args, kwargs, out):  # the block's output replaced by its input
        x = _hidden_in(args, kwargs)
        return (x, *out[1:]) if isinstance(out, tuple) else x

    scores = []
    for block in tqdm(blocks, desc="layer perplexity", unit="layer", leave=False):
        handle = block.register_forward_hook(skip, with_kwargs=True)
        try:
            scores.append(_mean_nll(model, ids, batch_size) - base)
        finally:
            handle.remove()
    return torch.tensor(scores)


def apply_prune_depth(model: nn.Module, config: PruneDepth, calib: Tensor | None = None) -> nn.Module:
    check_model(model)
    _check_calib(calib, "PruneDepth")
    L = len(decoder_blocks(model))
    n = _count(config.layers, L)
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
    drop = S.drop_lowest(scores, n)
    log.info("depth pruning: %s per layer %s; dropping layers %s", config.metric,
             [round(s, 4) for s in scores.tolist()], drop)  # fmt: skip
    return remove_layers(model, drop)


def _n_params(module: nn.Module) -> int:
    from slimlm.eval.size import unique_params

    return sum(p.numel() for p in unique_params(module))


def _unit_params(block: nn.Module, head_dim: int) -> dict[str, int]:
    """Parameters one query head, one KV head and one MLP neuron hold in ``block`` (biases included)."""
    q, k, o = (block.get_submodule(f"self_attn.{n}") for n in ("q_proj", "k_proj", "o_proj"))
    gate, down = block.get_submodule("mlp.gate_proj"), block.get_submodule("mlp.down_proj")
    return dict(
        head_params=head_dim * (q.in_features + (q.bias is not None) + o.out_features),
        kv_params=2 * head_dim * (k.in_features + (k.bias is not None)),
        neuron_params=2 * (gate.in_features + (gate.bias is not None)) + down.out_features,
        block_params=_n_params(block),
    )


def apply_structured(model: nn.Module, config: Structured, calib: Tensor | None = None) -> nn.Module:
    check_model(model)
    _check_calib(calib, "Structured")
    blocks = decoder_blocks(model)
    L, total = len(blocks), _n_params(model)
    target = config.params * total
    layout = head_layout(model.config)
    units = _unit_params(blocks[0], layout.head_dim)
    block_params = units.pop("block_params")
    if config.mode == "depth":
        n = round(target / block_params)
        if n >= L:
            most = (L - 1) * block_params / total
            raise SlimlmError(f"params={config.params} would remove {n} of the {L} decoder layers; depth pruning "
                              f"removes at most {most:.1%} of this model (keep one layer); lower params")  # fmt: skip
        step = PruneDepth(layers=n, metric=config.metric, ppl_samples=config.ppl_samples, batch_size=config.batch_size)
        return _log_removed(apply_prune_depth(model, step, calib), total, config)
    n_neurons = blocks[0].get_submodule("mlp.down_proj").in_features
    shape = dict(n_heads=layout.n_heads, n_kv=layout.n_kv_heads, **units)
    if config.attention == "search":
        plans = S.width_candidates(target / L, **shape)
    else:
        plans = [S.width_plan(target / L, attention=config.attention, block_params=block_params, **shape)]
    plans = [p for p in plans if p[2] < n_neurons]
    if not plans:
        raise SlimlmError(f"params={config.params} needs more MLP neurons per layer than the {n_neurons} there are: "
                          "more than width pruning can take; lower params or use mode: depth")  # fmt: skip
    counts = search_width(model, plans, calib, samples=config.search_samples, batch_size=config.batch_size)
    return _log_removed(prune_width(model, counts, calib, batch_size=config.batch_size), total, config)


def search_width(model: nn.Module, plans: list[tuple[int, int, int]], calib: Tensor, *, samples: int,
                 batch_size: int) -> tuple[int, int, int]:  # fmt: skip
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
        losses.append(_mean_nll(trial, ids, min(batch_size, 2)))
        del trial
    log.info("width search (heads per group, groups, neurons) -> calibration NLL: %s",
             {p: round(x, 4) for p, x in zip(plans, losses)})  # fmt: skip
    return plans[min(range(len(plans)), key=losses.__getitem__)]


def _log_removed(model: nn.Module, before: int, config: Structured) -> nn.Module:
    after = _n_params(model)
    log.info("%s: %d -> %d parameters (%.1f%% removed, target %.1f%%)", config, before, after,
             100 * (1 - after / before), 100 * config.params)  # fmt: skip
    return model
