"""What the device offers: op availability and GPU capability, probed once and cached.

This module and its siblings in :mod:`slimlm.kernels` are the only places in
slimlm that look at a device's type.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_aten_op(name: str) -> bool:
    """Whether this torch build registers ``torch.ops.aten.<name>``."""
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def cuda_capability(index: int) -> tuple[int, int]:
    """Compute capability ``(major, minor)`` of CUDA device ``index``."""
    return torch.cuda.get_device_capability(index)


def is_cpu(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def is_cuda_sm80(device: torch.device) -> bool:
    """An Ampere or newer CUDA GPU (bf16 tensor cores, torch's int4 kernels)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return cuda_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)
