"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

After the attention and after the MLP of every block, before the residual
add, a small residual bottleneck::

    h -> h + up(act(down(h)))        down: d -> m, up: m -> d, m << d

``up`` starts at zero, so the adapted model starts as the base. The output
of a block's attention (or MLP) is the output of its last linear (o_proj,
down_proj; the adapter table's groups fed by no norm), so the adapter wraps
that linear: :class:`HoulsbyLinear` runs the base linear, then the
bottleneck. The decoder's fast path calls non-plain linears as modules, so
generation sees the adapters too. peft has no Houlsby tuner; this one is ours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import decoder_blocks, get_adapter
from slimlm.nn.runtime import replace_module
from slimlm.targets import Targets, select_linears

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}

__all__ = ["Bottleneck", "HoulsbyLinear", "add_adapters", "output_linears"]


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` zero-initialised (the identity at the start)."""

    def __init__(self, d: int, size: int, nonlinearity: str = "gelu", *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        self.down = nn.Linear(d, size, device=device, dtype=dtype)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(size, d, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:  # (..., d)
        return h + self.up(self.act(self.down(h)))


class HoulsbyLinear(nn.Module):
    """A block's output linear followed by a :class:`Bottleneck` on its output."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base_layer(x))


def output_linears(model: nn.Module) -> list[str]:
    """Full names of each block's attention and MLP output linears (the groups no norm feeds)."""
    adapter = get_adapter(model)
    rels = [rel for g in adapter.groups if g.norm is None for rel in g.linears]
    return [f"{adapter.blocks}.{i}.{rel}" for i in range(len(decoder_blocks(model))) for rel in rels]


@torch.no_grad()
def add_adapters(model: nn.Module, targets: Targets, *, size: int, nonlinearity: str) -> list[nn.Parameter]:
    """Wrap each output linear ``targets`` selects in a :class:`HoulsbyLinear` (in place); -> the new parameters."""
    selected = select_linears(model, targets)
    chosen = [n for n in output_linears(model) if n in selected]
    if not chosen:
        raise SlimlmError(f"adapters go after the blocks' output linears ({output_linears(model)[0]}, ...); "
                          f"the targets select none of them")  # fmt: skip
    params: list[nn.Parameter] = []
    d = model.config.get_text_config().hidden_size
    ref = model.get_input_embeddings().weight
    for name in chosen:
        adapter = Bottleneck(d, size, nonlinearity, device=ref.device, dtype=ref.dtype)
        replace_module(model, name, HoulsbyLinear(model.get_submodule(name), adapter))
        params += list(adapter.parameters())
    return params
