"""Shared second-order solvers: the OBS column loop behind GPTQ and SparseGPT."""

from slimlm.solvers.obs import LazyBlock, dampen_and_invert, obs_solve

__all__ = ["LazyBlock", "dampen_and_invert", "obs_solve"]
