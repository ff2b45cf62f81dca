"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning"): train biases only.

The paper trains every bias of a BERT. LLaMA-family linears have no bias, so
what trains there is a choice, and both are offered: the norm weights (which
scale the inputs of q/k/v and gate/up, the closest thing such a model has
to trainable offsets) always, plus either the biases the model has (none in
LLaMA) or, with ``zero_biases``, new zero biases on the target linears
(zero, so the model starts unchanged). peft has no BitFit tuner; this one is ours.

The added biases must survive saving: a stock loader builds a linear with a
bias only where the config says so (LLaMA's ``attention_bias`` gives q/k/v/o
one, ``mlp_bias`` gate/up/down; the adapter table's ``bias_flags`` lists each
family's). So the biases are added only where they complete such a group in
every block, the flag is then set, and the saved model reloads (slimlm or
``AutoModelForCausalLM``) with them; any other set is refused before anything
changes.
"""

from __future__ import annotations

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import decoder_blocks, get_adapter, text_config
from slimlm.nn import RuntimeModule
from slimlm.targets import Targets, select_linears

__all__ = ["bitfit_parameters", "declare_biases", "norm_modules"]


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm (RMSNorm, LayerNorm: a class whose name ends in Norm) with a weight, by full name."""
    return {name: m for name, m in model.named_modules()
            if type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), nn.Parameter)}  # fmt: skip


def declare_biases(model: nn.Module, added: list[str]) -> list[str]:
    """The config flags that make a stock loader build biases on exactly the linears in ``added`` (full names);
    refuses (one line) a set that no combination of the family's flags describes."""
    adapter = get_adapter(model)
    n_blocks = len(decoder_blocks(model))
    todo, flags = set(added), []
    for flag, rels in adapter.bias_flags:
        group = [f"{adapter.blocks}.{i}.{rel}" for i in range(n_blocks) for rel in rels]
        hit = [n for n in group if n in todo]
        if not hit:
            continue
        left = [n for n in group if n not in todo and getattr(model.get_submodule(n), "bias", None) is None]
        if left:
            raise SlimlmError(f"zero_biases would add a bias to {hit[0]} but not to {left[0]}; {flag} in the "
                              f"{adapter.family} config gives all of {', '.join(r.rsplit('.', 1)[-1] for r in rels)} "
                              "in every block a bias or none: target all of them, or none")  # fmt: skip
        flags.append(flag)
        todo -= set(group)
    if todo:
        stray = sorted(todo, key=added.index)[0]
        names = " / ".join(flag for flag, _ in adapter.bias_flags) or "no bias flag"
        raise SlimlmError(f"zero_biases would add a bias to {stray}, which the {adapter.family} config ({names}) "
                          "cannot declare, so a saved model would lose it: exclude it, or set zero_biases: false")
    return flags


@torch.no_grad()
def bitfit_parameters(model: nn.Module, targets: Targets, *, zero_biases: bool) -> tuple[list[nn.Parameter], str]:
    """The parameters BitFit trains (adding zero biases first when asked) and a one-line summary."""
    linears = select_linears(model, targets)
    added = 0
    if zero_biases:
        missing = [name for name, m in linears.items() if getattr(m, "bias", None) is None]
        cfg = text_config(model.config)
        for flag in declare_biases(model, missing):  # refuses before anything changes
            setattr(cfg, flag, True)
        for m in linears.values():
            if getattr(m, "bias", None) is None:
                out = m.out_features if hasattr(m, "out_features") else m.weight.shape[1]  # Conv1D: (in, out)
                ref = next(iter(m.state_dict().values()))
                dtype = ref.dtype if ref.is_floating_point() else getattr(m, "compute_dtype", torch.float32)
                m.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=ref.device))
                added += 1
    biases = [m.bias for m in linears.values() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    norms = norm_modules(model)
    params = biases + [m.weight for m in norms.values()]
    params += [m.bias for m in norms.values() if isinstance(getattr(m, "bias", None), nn.Parameter)]
    n = sum(p.numel() for p in params)
    packed = sum(isinstance(m, RuntimeModule) for m in linears.values())
    summary = (f"{n} parameters: {len(biases)} linear biases ({added} added as zeros, {packed} on compressed "
               f"linears) and {len(norms)} norms ({get_adapter(model).family})")  # fmt: skip
    return params, summary
