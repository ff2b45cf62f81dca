"""Low-rank factorization: each target linear becomes two thin matrices (:class:`slimlm.nn.LowRankLinear`).

Three methods, one best-rank-r solver (:mod:`slimlm.solvers.lowrank`) with a
different whitening each: plain SVD (:class:`SVD`), ASVD's activation scaling
(:class:`ASVD`, :mod:`.asvd`) and SVD-LLM's Cholesky whitening (:class:`SVDLLM`,
:mod:`.svd_llm`); ranks per layer from a parameter budget (uniform or spread by
the spectra), an energy threshold or a fixed rank (:mod:`.config`, :mod:`.ranks`).
"""

from slimlm.lowrank.config import ASVD, SVD, SVDLLM, LowRank
from slimlm.lowrank.handler import apply_lowrank, needs_calibration

__all__ = ["ASVD", "SVD", "SVDLLM", "LowRank", "apply_lowrank", "needs_calibration"]
