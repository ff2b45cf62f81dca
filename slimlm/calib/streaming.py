"""Compress a model larger than memory: blocks read lazily from safetensors, written out as shards.

    model, tokenizer = load_lazy("smollm2-135m")        # block weights stay on disk
    compress_lazy(model, tokenizer, [GPTQ()], "out/gptq", calib=ids)

Each decoder block is read just before it is needed, compressed, written as
its own shard of the checkpoint (``slimlm.io.ShardWriter``) and freed, so the
peak memory is about one block, the calibration activations and the tensors
outside the blocks (embeddings, lm_head). The result is bit-identical to the
same recipe run on the fully loaded model.

One step per recipe, of a method that walks the blocks once: RTN, GPTQ
(lm_head excluded: its Hessian needs a forward of the whole compressed
model), AWQ, and mixed precision with ``sensitivity: hessian`` (a statistics
pass that only reads the blocks, the global bit allocation, then a
quantization pass). Methods that need the whole model at once (QAT trains it
end to end, the Fisher sensitivity back-propagates through it) are refused,
and so are multi-step recipes, whose second step would need the blocks the
first one already wrote out.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.calib.runner import peak_rss_mb
from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir
from slimlm.models.adapters import get_adapter
from slimlm.models.lazy import LazyBlocks, Sink, lazy_blocks

log = logging.getLogger("slimlm.calib")


def _runners() -> dict[type, Any]:
    """Config type -> how it runs lazily."""
    from slimlm.quant.awq_handler import AWQ
    from slimlm.quant.gptq_handler import GPTQ
    from slimlm.quant.mixed_handler import MixedPrecision
    from slimlm.quant.rtn import RTN

    return {RTN: _run_rtn, GPTQ: _run_calibrated, AWQ: _run_calibrated, MixedPrecision: _run_mixed}


def check_lazy(configs: list[Any]) -> None:
    """Refuse, in one line, a recipe that lazy compression cannot run."""
    from slimlm.quant.gptq_handler import GPTQ

    runners = _runners()
    names = ", ".join(t.__name__ for t in runners)
    if len(configs) != 1:
        steps = ", ".join(type(c).__name__ for c in configs)
        raise SlimlmError(f"lazy compression runs a recipe of exactly one step ({names}); this one has "
                          f"{len(configs)} ({steps}): run it without --lazy")  # fmt: skip
    config = configs[0]
    if type(config) not in runners:
        raise SlimlmError(f"{type(config).__name__} cannot run lazily (it needs the whole model at once); "
                          f"lazy methods: {names}; run it without --lazy")  # fmt: skip
    if isinstance(config, GPTQ) and config.targets.lm_head:
        raise SlimlmError("GPTQ of lm_head needs a forward of the whole compressed model: with --lazy set "
                          "lm_head: false, or run it without --lazy")  # fmt: skip
    if getattr(config, "sensitivity", "hessian") != "hessian":
        raise SlimlmError(f"{type(config).__name__} with sensitivity {config.sensitivity!r} needs backward passes "
                          "through the whole model: with --lazy set sensitivity: hessian, or run it without "
                          "--lazy")  # fmt: skip


def compress_lazy(model: nn.Module, tokenizer: Any, configs: list[Any], out_dir: str | os.PathLike, *,
                  calib: Tensor | None = None, base_model: str | None = None, recipe: Any = None,
                  calibration: dict[str, Any] | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Run one-step recipe ``configs`` on a model from ``load_lazy`` and save the checkpoint to ``out_dir``.

    The output (sharded, see :mod:`slimlm.io`) is written atomically; the model
    is left without its blocks (each was freed once written): load the saved
    checkpoint with ``load_compressed`` to use it.
    """
    from slimlm.io import ShardWriter

    lazy = lazy_blocks(model)
    if lazy is None:
        raise SlimlmError("compress_lazy needs a model from slimlm.models.load_lazy(...); use apply() and "
                          "save_compressed() for a fully loaded one")  # fmt: skip
    check_lazy(configs)
    config = configs[0]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, blocks_prefix=get_adapter(model).blocks, n_blocks=len(lazy))
        try:
            _runners()[type(config)](model, config, calib, lazy, writer.write_block)
        finally:
            lazy.sink = None
        writer.finish(model, tokenizer, base_model=base_model, recipe=recipe, calibration=calibration)
    rss = peak_rss_mb()
    log.info("lazily compressed into %s: %d block shards, at most %d block(s) in memory at once, process peak "
             "RSS %s MB", out_dir, len(lazy), lazy.peak_live, f"{rss:.0f}" if rss else "?")  # fmt: skip
    return Path(out_dir)


def _run_calibrated(model: nn.Module, config: Any, calib: Tensor | None, lazy: LazyBlocks, sink: Sink) -> None:
    """GPTQ, AWQ: their handler's calibration walk reads, rewrites and hands on each block."""
    from slimlm.api import apply

    lazy.sink = sink
    apply(model, config, calib)


def _run_rtn(model: nn.Module, config: Any, calib: Tensor | None, lazy: LazyBlocks, sink: Sink) -> None:
    from slimlm.quant.rtn import check_schemes
    from slimlm.targets import select_linears

    linears = select_linears(model, config.targets)
    plan = {name: (m, config.scheme_for(name)) for name, m in linears.items()}
    check_schemes(plan)
    lazy.sink = sink
    quantize_per_block(model, lazy, {name: scheme for name, (_, scheme) in plan.items()}, linears)


def _run_mixed(model: nn.Module, config: Any, calib: Tensor | None, lazy: LazyBlocks, sink: Sink) -> None:
    from slimlm.quant.mixed_handler import log_allocation, mixed_allocation
    from slimlm.targets import select_linears

    alloc = mixed_allocation(model, config, calib)  # no sink yet: this pass only reads the blocks
    log_allocation(alloc)
    if config.quantizer == "gptq":  # a second walk: GPTQ reads, solves and hands on each block
        _run_calibrated(model, config.gptq_config(alloc.schemes), calib, lazy, sink)
        return
    lazy.sink = sink
    quantize_per_block(model, lazy, alloc.schemes, select_linears(model, config.targets))


def quantize_per_block(model: nn.Module, lazy: LazyBlocks, schemes: dict[str, Any],
                       linears: dict[str, nn.Module]) -> None:  # fmt: skip
    """Round each linear in ``schemes`` (full name -> scheme) to a QuantLinear, one block in memory at a time."""
    from slimlm.nn import QuantLinear
    from slimlm.targets import replace_module

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
