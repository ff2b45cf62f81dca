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
    from slimlm.prune.gradual import GradualMagnitude, apply_gradual_magnitude
    from slimlm.prune.handlers import Magnitude, SparseGPT, Wanda, apply_magnitude, apply_sparsegpt, apply_wanda
    from slimlm.prune.structured_handler import (PruneDepth, PruneWidth, Structured, apply_prune_depth,
                                                   apply_prune_width, apply_structured)
    from slimlm.quant.awq_handler import AWQ, apply_awq
    from slimlm.quant.gptq_handler import GPTQ, apply_gptq
    from slimlm.quant.llm_int8 import LLMInt8, apply_llm_int8
    from slimlm.quant.mixed_handler import MixedPrecision, apply_mixed
    from slimlm.quant.qat import QAT, apply_qat
    from slimlm.quant.rtn import RTN, apply_rtn
    from slimlm.quant.w8a8 import W8A8, SmoothQuant, apply_smoothquant, apply_w8a8

    return {
        RTN: apply_rtn,
        GPTQ: apply_gptq,
        AWQ: apply_awq,
        W8A8: apply_w8a8,
        SmoothQuant: apply_smoothquant,
        LLMInt8: apply_llm_int8,
        MixedPrecision: apply_mixed,
        QAT: apply_qat,
        PruneWidth: apply_prune_width,
        PruneDepth: apply_prune_depth,
        Structured: apply_structured,
        Magnitude: apply_magnitude,
        Wanda: apply_wanda,
        SparseGPT: apply_sparsegpt,
        GradualMagnitude: apply_gradual_magnitude,
    }


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


def needs_calibration(configs: list[Any]) -> bool:
    """Whether any config's method gathers statistics from calibration text."""
    return any(getattr(c, "needs_calibration", False) for c in configs)


def calibration_ids(tokenizer: Any, protocol: str = "wiki-v1", *, n_samples: int | None = None) -> torch.Tensor:
    """The protocol's calibration batch: (n_samples, seq_len) token ids, seeded.

    Drawn from the protocol's calibration split, which is disjoint (by article)
    from the evaluation text.
    """
    from slimlm.data import calibration_batch, protocol_texts
    from slimlm.eval.protocol import get_protocol

    proto = get_protocol(protocol)
    if n_samples is not None and n_samples < 1:
        raise SlimlmError(f"--calib-samples must be >= 1, got {n_samples}")
    docs = protocol_texts(proto.text).calibration
    return calibration_batch(tokenizer, docs, n_samples=n_samples or proto.calib_samples,
                             seq_len=proto.calib_seq_len, seed=proto.calib_seed)  # fmt: skip


def apply_all(model: nn.Module, configs: list[Any], calib: torch.Tensor | None = None) -> nn.Module:
    """Apply configs in order (a recipe's steps)."""
    for config in configs:
        model = apply(model, config, calib)
    return model
