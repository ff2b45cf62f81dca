"""Compress a model larger than memory: blocks read lazily from safetensors, written out as shards.

    model, tokenizer = load_lazy("smollm2-135m")        # block weights stay on disk
    compress_lazy(model, tokenizer, [GPTQ()], "out/gptq", calib=ids)

Each decoder block is read just before it is needed, compressed, written as
its own shard of the checkpoint (``slimlm.io.ShardWriter``) and freed, so the
peak memory is about one block, the calibration activations and the tensors
outside the blocks (embeddings, lm_head). The result is bit-identical to the
same recipe run on the fully loaded model.

Which methods run lazily, and what a lazy run of each refuses, is the
registry's ``lazy`` / ``lazy_check`` (:mod:`slimlm.methods`): today RTN,
GPTQ (lm_head excluded: its Hessian needs a forward of the whole compressed
model), AWQ, mixed precision with ``sensitivity: hessian``, and SVD / ASVD /
SVD-LLM with ranks from each layer alone (``allocation: uniform``, ``energy``,
``rank``; :mod:`slimlm.lowrank.lazy`). Methods that
need the whole model at once (QAT trains it end to end, the Fisher
sensitivity back-propagates through it) are refused, and so are multi-step
recipes, whose second step would need the blocks the first one already
wrote out.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from slimlm.calib.runner import peak_rss_mb
from slimlm.errors import SlimlmError
from slimlm.fsutil import atomic_dir
from slimlm.io import ShardWriter
from slimlm.methods import METHODS, method_for
from slimlm.models.adapters import get_adapter
from slimlm.models.lazy import lazy_blocks

log = logging.getLogger("slimlm.pipelines")


def check_lazy(configs: list[Any]) -> None:
    """Refuse, in one line, a recipe that lazy compression cannot run."""
    names = ", ".join(m.config.__name__ for m in METHODS.values() if m.lazy is not None)
    if len(configs) != 1:
        steps = ", ".join(type(c).__name__ for c in configs)
        raise SlimlmError(f"lazy compression runs a recipe of exactly one step ({names}); this one has "
                          f"{len(configs)} ({steps}): run it without --lazy")  # fmt: skip
    method = method_for(configs[0])
    if method.lazy is None:
        raise SlimlmError(f"{type(configs[0]).__name__} cannot run lazily (it needs the whole model at once); "
                          f"lazy methods: {names}; run it without --lazy")  # fmt: skip
    if method.lazy_check is not None:
        method.lazy_check(configs[0])
    if getattr(getattr(configs[0], "targets", None), "embedding", "float") == "shared":
        raise SlimlmError("embedding: shared swaps the input embedding, which lazy compression writes before the "
                          "head is quantized: run it without --lazy, or drop embedding: shared")  # fmt: skip


def compress_lazy(model: nn.Module, tokenizer: Any, configs: list[Any], out_dir: str | os.PathLike, *,
                  calib: Tensor | None = None, base_model: str | None = None, recipe: Any = None,
                  calibration: dict[str, Any] | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Run one-step recipe ``configs`` on a model from ``load_lazy`` and save the checkpoint to ``out_dir``.

    The output (sharded, see :mod:`slimlm.io`) is written atomically; the model
    is left without its blocks (each was freed once written): load the saved
    checkpoint with ``load_compressed`` to use it.
    """
    lazy = lazy_blocks(model)
    if lazy is None:
        raise SlimlmError("compress_lazy needs a model from slimlm.models.load_lazy(...); use apply() and "
                          "save_compressed() for a fully loaded one")  # fmt: skip
    check_lazy(configs)
    config = configs[0]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, blocks_prefix=get_adapter(model).blocks, n_blocks=len(lazy))
        try:
            method_for(config).lazy(model, config, calib, writer.write_block)
        finally:
            lazy.sink = None
        writer.finish(model, tokenizer, base_model=base_model, recipe=recipe, calibration=calibration)
    rss = peak_rss_mb()
    log.info("lazily compressed into %s: %d block shards, at most %d block(s) in memory at once, process peak "
             "RSS %s MB", out_dir, len(lazy), lazy.peak_live, f"{rss:.0f}" if rss else "?")  # fmt: skip
    return Path(out_dir)
