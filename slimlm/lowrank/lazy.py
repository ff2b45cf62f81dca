"""Low-rank factorization under ``--lazy`` (:mod:`slimlm.pipelines.lazy`): one block in memory at a time.

With ``allocation: uniform``, ``energy`` or ``rank`` a layer's rank comes
from the layer alone (its shape, or its own whitened spectrum), so the one
walk that factorizes the blocks can hand each to the sink as it finishes:
ASVD and SVD-LLM walk with the calibration runner (which reads and releases
each block), plain SVD reads, factorizes and releases each block in turn
(:func:`slimlm.lowrank.handler.apply_lowrank` does both on a lazily loaded
model). The result is the one the fully loaded model gets.
"""

from __future__ import annotations

from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.lowrank.config import LowRank
from slimlm.lowrank.handler import apply_lowrank, needs_calibration
from slimlm.models.lazy import Sink, lazy_blocks

__all__ = ["check_lowrank_lazy", "lowrank_lazy"]


def check_lowrank_lazy(config: LowRank) -> None:
    """Refuse what a lazy run cannot honour: a spectrum allocation, a calibrated lm_head."""
    if config.allocation == "spectrum":
        raise SlimlmError("allocation: spectrum reads every layer's spectrum before cutting the first, a second "
                          "pass over blocks a lazy run has already written out: with --lazy use allocation: "
                          "uniform (or energy / rank), or run it without --lazy")  # fmt: skip
    if needs_calibration(config) and config.targets.head:
        raise SlimlmError(f"{type(config).__name__} of lm_head needs a forward of the whole factorized model: with "
                          "--lazy set lm_head: false, or run it without --lazy")  # fmt: skip


def lowrank_lazy(model: nn.Module, config: LowRank, calib: Tensor | None, sink: Sink) -> None:
    lazy = lazy_blocks(model)
    if lazy is None:
        raise SlimlmError("a lazy run needs a model from slimlm.models.load_lazy(...)")
    check_lowrank_lazy(config)
    lazy.sink = sink
    apply_lowrank(model, config, calib)
