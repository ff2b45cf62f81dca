"""Self-speculative drafting: the target's own first N blocks, final norm and lm_head as the draft.

Early exit as the draft: Zhang et al. 2023, "Draft & Verify: Lossless LLM acceleration via
self-speculative decoding" (which skips chosen layers); Elhoushi et al. 2024, "LayerSkip" (which
exits after the first layers, as here). The view shares every weight with the target.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import get_adapter, num_layers, text_config


def shallow_view(model: nn.Module, n_layers: int) -> nn.Module:
    """The model with only its first ``n_layers`` decoder blocks, sharing every weight with it.

    The modules on the path to the block list are shallow copies (their own child dict and a
    config with ``n_layers`` layers); blocks, embeddings, final norm and lm_head are the
    target's own objects, so the view costs no memory.
    """
    adapter = get_adapter(model)
    total = num_layers(model.config)
    if not 1 <= n_layers < total:
        raise SlimlmError(f"a self-speculative draft needs 1 <= layers < {total} (the target's depth), got {n_layers}")
    config = copy.deepcopy(model.config)
    tcfg = text_config(config, adapter)
    setattr(tcfg, adapter.n_layers_attr, n_layers)
    if getattr(tcfg, "layer_types", None):
        tcfg.layer_types = list(tcfg.layer_types)[:n_layers]
    configs = {id(model.config): config, id(text_config(model.config, adapter)): tcfg}
    view = parent = _shallow(model, configs)
    *path, last = adapter.blocks.split(".")
    for name in path:
        child = _shallow(parent._modules[name], configs)
        parent._modules[name] = child
        parent = child
    parent._modules[last] = nn.ModuleList(list(parent._modules[last])[:n_layers])
    return view


def _shallow(module: nn.Module, configs: dict[int, Any]) -> nn.Module:
    """A copy of ``module`` holding the same parameters and children in a child table of its own."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    old = getattr(module, "config", None)
    if old is not None and id(old) in configs:
        new.config = configs[id(old)]
    return new
