"""Lazy (larger-than-RAM) forms of the quantizers, for :mod:`slimlm.pipelines.lazy`.

A lazily loaded model (:func:`slimlm.models.lazy.load_lazy`) keeps its block
weights on disk; ``materialize(i)`` reads block ``i`` and ``release(i)``
hands it to the sink (a shard writer) and frees it. GPTQ and AWQ need
nothing here: their calibration walk already reads, rewrites and releases
one block at a time (the registry runs their handler with the sink set).
RTN, which otherwise swaps every linear at once, and mixed precision, which
first reads every block for its allocation, get their walks below; the
``check_*_lazy`` functions refuse configs a lazy run cannot honour.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.formats import Scheme
from slimlm.models.adapters import get_adapter
from slimlm.models.lazy import LazyBlocks, Sink, lazy_blocks
from slimlm.nn import QuantLinear, check_schemes
from slimlm.quant.awq_handler import apply_awq
from slimlm.quant.gptq_handler import GPTQ, apply_gptq
from slimlm.quant.mixed_handler import MixedPrecision, log_allocation, mixed_allocation
from slimlm.quant.rtn import RTN
from slimlm.targets import replace_module, scheme_plan, select_linears

LazyRun = Callable[[nn.Module, Any, Tensor | None, Sink], None]


def _lazy(model: nn.Module) -> LazyBlocks:
    lazy = lazy_blocks(model)
    if lazy is None:
        raise SlimlmError("a lazy run needs a model from slimlm.models.load_lazy(...)")
    return lazy


def walking(handler: Callable[[nn.Module, Any, Tensor | None], nn.Module]) -> LazyRun:
    """The lazy form of a method whose handler walks the blocks with the calibration runner
    (:func:`slimlm.calib.calibrate_blocks`): the walk hands each finished block to ``sink``."""

    def run(model: nn.Module, config: Any, calib: Tensor | None, sink: Sink) -> None:
        _lazy(model).sink = sink
        handler(model, config, calib)

    return run


gptq_lazy = walking(apply_gptq)
awq_lazy = walking(apply_awq)


def check_gptq_lazy(config: GPTQ) -> None:
    if config.targets.head:
        raise SlimlmError("GPTQ of lm_head needs a forward of the whole compressed model: with --lazy set "
                          "lm_head: false, or run it without --lazy")  # fmt: skip


def rtn_lazy(model: nn.Module, config: RTN, calib: Tensor | None, sink: Sink) -> None:
    plan = scheme_plan(model, config.targets, config.scheme_for)
    check_schemes(plan)
    linears = {name: m for name, (m, _) in plan.items()}
    _lazy(model).sink = sink
    quantize_per_block(model, {name: scheme for name, (_, scheme) in plan.items()}, linears)


def mixed_lazy(model: nn.Module, config: MixedPrecision, calib: Tensor | None, sink: Sink) -> None:
    alloc = mixed_allocation(model, config, calib)  # no sink yet: this pass only reads the blocks
    log_allocation(alloc)
    if config.quantizer == "gptq":  # a second walk: GPTQ reads, solves and hands on each block
        gptq_lazy(model, config.gptq_config(alloc.schemes), calib, sink)
        return
    _lazy(model).sink = sink
    quantize_per_block(model, alloc.schemes, select_linears(model, config.targets))


def check_mixed_lazy(config: MixedPrecision) -> None:
    if config.sensitivity != "hessian":
        raise SlimlmError(f"MixedPrecision with sensitivity {config.sensitivity!r} needs backward passes through "
                          "the whole model: with --lazy set sensitivity: hessian, or run it without --lazy")  # fmt: skip


def quantize_per_block(model: nn.Module, schemes: dict[str, Scheme], linears: dict[str, Any]) -> None:
    """Round each linear in ``schemes`` (full name -> scheme) to a QuantLinear, one block in memory at a time."""
    lazy = _lazy(model)
    pattern = re.compile(re.escape(get_adapter(model).blocks) + r"\.(\d+)\.")
    by_block: dict[int, list[str]] = {}
    outside = []
    for name in schemes:
        m = pattern.match(name)
        (by_block.setdefault(int(m.group(1)), []) if m else outside).append(name)
    for i in tqdm(range(len(lazy)), desc="quantize", unit="block", leave=False):
        lazy.materialize(i)
        for name in by_block.get(i, []):
            replace_module(model, name, QuantLinear.from_linear(linears[name], schemes[name]))
        lazy.release(i)
    for name in outside:  # lm_head: already in memory
        replace_module(model, name, QuantLinear.from_linear(linears[name], schemes[name]))
