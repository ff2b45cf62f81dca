"""Low-rank methods: factorization of weights and compensation of quantization error.

Factorization: each target linear becomes two thin matrices (:class:`slimlm.nn.LowRankLinear`).
Three methods, one best-rank-r solver (:mod:`slimlm.solvers.lowrank`) with a
different whitening each: plain SVD (:class:`SVD`), ASVD's activation scaling
(:class:`ASVD`, :mod:`.asvd`) and SVD-LLM's Cholesky whitening (:class:`SVDLLM`,
:mod:`.svd_llm`); ranks per layer from a parameter budget (uniform or spread by
the spectra), an energy threshold or a fixed rank (:mod:`.config`, :mod:`.ranks`).

Compensation (EoRA, :mod:`.compensate`): the same solver applied to a quantized
layer's error W - Q(W), kept as a float side path (:class:`slimlm.nn.CompensatedLinear`).
"""

from slimlm.lowrank.compensate import compensation, output_error
from slimlm.lowrank.compensate_handler import EoRA, apply_eora
from slimlm.lowrank.config import ASVD, SVD, SVDLLM, LowRank
from slimlm.lowrank.handler import apply_lowrank, needs_calibration

__all__ = ["ASVD", "SVD", "SVDLLM", "EoRA", "LowRank", "apply_eora", "apply_lowrank", "compensation",
           "needs_calibration", "output_error"]
