"""apply(model, config, calib): look the config's type up in one table and run its handler.

A recipe is a plain loop over configs. Handlers are short glue: pick target
modules, gather statistics, call the algorithm, swap the module.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm")

Handler = Callable[[nn.Module, Any, Any], nn.Module]


def handlers() -> dict[type, Handler]:
    """Config type -> handler. Imported here, once, so the table is greppable."""
    from slimlm.quant.rtn import RTN, apply_rtn

    return {RTN: apply_rtn}


def apply(model: nn.Module, config: Any, calib: torch.Tensor | None = None) -> nn.Module:
    """Apply one compression config to ``model`` in place and return it."""
    table = handlers()
    handler = table.get(type(config))
    if handler is None:
        names = ", ".join(t.__name__ for t in table)
        raise SlimlmError(f"no handler for {type(config).__name__}; known configs: {names}")
    log.info("applying %s", config)
    with torch.no_grad():
        return handler(model, config, calib)


def apply_all(model: nn.Module, configs: list[Any], calib: torch.Tensor | None = None) -> nn.Module:
    """Apply configs in order (a recipe's steps)."""
    for config in configs:
        model = apply(model, config, calib)
    return model
