"""apply(model, config, calib): look the config's type up in the registry and run its handler.

The registry is :mod:`slimlm.methods`. A recipe is a plain loop over
configs. Handlers are short glue: pick target modules, gather statistics,
call the algorithm, swap the module.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from slimlm.methods import method_for

log = logging.getLogger("slimlm")


def apply(model: nn.Module, config: Any, calib: torch.Tensor | None = None) -> nn.Module:
    """Apply one compression config to ``model`` in place and return it (the registry picks the handler)."""
    method = method_for(config)
    log.info("applying %s", config)
    with torch.no_grad():
        return method.apply(model, config, calib)


def needs_calibration(configs: list[Any]) -> bool:
    """Whether any config's method gathers statistics from calibration text."""
    return any(method_for(c).needs_calibration(c) for c in configs)


def apply_all(model: nn.Module, configs: list[Any], calib: torch.Tensor | None = None) -> nn.Module:
    """Apply configs in order (a recipe's steps)."""
    for config in configs:
        model = apply(model, config, calib)
    return model
