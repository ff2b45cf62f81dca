"""Module surgery for structured pruning: smaller linears, fewer layers, a config that matches.

``prune_attention`` keeps chosen query and KV heads, ``prune_mlp`` chosen
intermediate neurons, ``remove_layers`` whole decoder layers (renumbering
``layer_idx`` and ``layer_types``); ``set_width_config`` writes the new
widths into ``model.config`` so the model reloads with stock transformers.
Which units go is decided elsewhere (:mod:`slimlm.prune.structured`).
"""

from __future__ import annotations

from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import ADAPTERS, Adapter, decoder_blocks, get_adapter, text_config
from slimlm.prune.structured import head_rows, slice_cols, slice_rows
from slimlm.targets import replace_module

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Families whose blocks have separate q/k/v/o and gate/up/down linears (read from the adapter table).
SUPPORTED = tuple(f for f, a in ADAPTERS.items() if not a.fused and set(a.linear_names()) == {*ATTN, *MLP})


def check_model(model: nn.Module) -> Adapter:
    """The model's adapter, if structured pruning supports its family and its linears are float."""
    adapter = get_adapter(model)
    if adapter.family not in SUPPORTED:
        raise SlimlmError(f"structured pruning does not support model type {adapter.family!r}; "
                          f"supported: {', '.join(SUPPORTED)}")  # fmt: skip
    for i, block in enumerate(decoder_blocks(model)):
        for rel in (*ATTN, *MLP):
            m = block.get_submodule(rel)
            if type(m) is not nn.Linear:
                raise SlimlmError(f"{adapter.blocks}.{i}.{rel} is a {type(m).__name__}: structured pruning needs "
                                  "float nn.Linear weights; prune before quantizing")  # fmt: skip
    return adapter


def mlp_width(model: nn.Module) -> int:
    """MLP intermediate neurons per layer (uniform: read from the first block)."""
    return decoder_blocks(model)[0].get_submodule("mlp.down_proj").in_features


def _slice_linear(parent: nn.Module, name: str, *, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Replace the nn.Linear ``parent.name`` by one keeping output ``rows`` (and bias) or input ``cols``."""
    old = getattr(parent, name)
    W, b = old.weight.data, None if old.bias is None else old.bias.data
    if rows is not None:
        W, b = slice_rows(W, b, rows)
    if cols is not None:
        W = slice_cols(W, cols)
    new = nn.utils.skip_init(nn.Linear, W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    new.weight = nn.Parameter(W, requires_grad=old.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=old.bias.requires_grad)
    setattr(parent, name, new)


def prune_attention(attn: nn.Module, q_keep: Tensor, kv_keep: Tensor, head_dim: int) -> None:
    """Keep query heads ``q_keep`` and KV heads ``kv_keep`` of a llama-style attention module."""
    q_rows, kv_rows = head_rows(q_keep, head_dim), head_rows(kv_keep, head_dim)
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


def set_width_config(model: nn.Module, *, n_heads: int, n_kv: int, head_dim: int, n_neurons: int) -> None:
    """Write the pruned widths (uniform over layers) into the model's (text) config."""
    adapter = get_adapter(model)
    cfg = text_config(model.config, adapter)
    setattr(cfg, adapter.n_heads_attr, n_heads)
    setattr(cfg, adapter.n_kv_heads_attr, n_kv)
    # explicit: hidden_size // num_attention_heads no longer gives it
    setattr(cfg, adapter.head_dim_attr, head_dim)
    cfg.intermediate_size = n_neurons


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
