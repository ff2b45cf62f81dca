"""Prefill-sized float32 inputs to quantized weight-only kernels: multiply in float32 or in bfloat16.

With many rows (a 512-token prompt) a weight-only kernel dequantizes the
weight once per call and runs a GEMM; the GEMM is then most of the time.
Where the CPU multiplies bfloat16 natively (avx512_bf16, AMX), oneDNN's bf16
GEMM runs about 3.5x faster than float32's (576x576x512 at 2 threads: 0.59
vs 2.0 ms), so the ``bf16`` path (weight dequantized in float32 and rounded
once to bfloat16, activations rounded to bfloat16, output cast back) makes
quantized prefill faster than the float32 model's. The float32 path
(dequantize, float32 GEMM) was 0.79-0.84x the float32 model until the
weight was dequantized by the native library in one pass (``dequant.c``)
into one reused per-thread buffer (:func:`weight_buffer`): now on a par with
the float model, bit for bit the same numbers as before.
Decode paths already multiply in bfloat16 (``int4.py``, ``int8.py``), so the
numbers are those of the compute dtype the kernels declare.

The float32 path is the default everywhere: bfloat16 activations change the
numbers of every prompt and every evaluation window (perplexity, KLD), which
a speed tuner must not do behind the protocol's back. ``SLIMLM_KERNELS=
prefill:bf16`` asks for it (checked against float32 on first use, recorded
as a ``prefill`` choice of :mod:`slimlm.kernels.tune`); where bfloat16 is
emulated (no oneDNN support) it stays float32. Only float32 activations on
CPU have a choice; other dtypes multiply in their own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.kernels import tune
from slimlm.kernels.base import SELF_CHECK_TOL, Shape, relative_error



# Weights up to this many elements are dequantized into one float32 buffer per thread, reused by every
# prefill GEMM (a fresh multi-MB tensor per call costs its page faults again: ~0.95x -> ~1.0x the float model's
# prefill on SmolLM2); larger ones (a big lm_head) get their own tensor, so the buffer stays a layer's size.
BUFFER_MAX_ELEMENTS = 1 << 25
_LOCAL = threading.local()


def weight_buffer(shape: Shape, device: torch.device) -> Tensor | None:
    """A float32 ``shape`` CPU buffer this thread's next prefill GEMM dequantizes into (dead once that GEMM has
    read it), or None for a weight above :data:`BUFFER_MAX_ELEMENTS` or not on the CPU."""
    n = shape[0] * shape[1]
    if n > BUFFER_MAX_ELEMENTS or device.type != "cpu":
        return None
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _LOCAL.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(shape)


@functools.cache
def bf16_supported() -> bool:
    """Whether oneDNN says this CPU runs bfloat16 GEMMs (the fixed rule's answer)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())


def _agree(y: Tensor, ref: Tensor) -> bool:
    return relative_error(y, ref) <= SELF_CHECK_TOL[torch.bfloat16]


def has_choice(x: Tensor) -> bool:
    """Whether ``x`` may take the bf16 path at all: float32 activations on CPU."""
    return x.dtype is torch.float32 and x.device.type == "cpu"


def use_bf16(x: Tensor, shape: Shape, *, f32: Callable[[], Tensor], bf16: Callable[[], Tensor]) -> bool:
    """Whether the prefill-sized ``x (M, in)`` multiplies in bfloat16; ``f32``/``bf16`` run each path on ``x``.

    Only when asked (``SLIMLM_KERNELS=prefill:bf16``, checked against float32 on first use): rounding the
    activations to bfloat16 changes every number a prompt or an evaluation window produces, so it is
    not a speed choice the tuner may make on its own (perplexity and KLD stay float32 by default).
    """
    if not has_choice(x):
        return False
    t = tune.tuner()
    if t.settings.force("prefill") != "bf16" or not bf16_supported() or torch.compiler.is_compiling():
        return False
    key = tune.make_key("prefill", shape, x.dtype, x.shape[0], x.device)
    d = t.decision(key)  # the hot path: one dict lookup
    if d is not None:
        return d.path == "bf16"
    return t.choose(key, fixed="f32", candidates=lambda: {"f32": f32, "bf16": bf16}, agree=_agree) == "bf16"


def linear_bf16(x: Tensor, w: Tensor) -> Tensor:
    """``x (M, in) float32 @ w (out, in)^T`` with both rounded to bfloat16 once; float32 ``(M, out)``."""
    return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float()


def dequantized_matmul(x: Tensor, shape: Shape, weight: Callable[[], Tensor]) -> Tensor:
    """``x (M, in) -> (M, out)`` for a prefill-sized ``x``: ``weight()`` is the float32 ``(out, in)`` weight,
    dequantized once per call (kernels write it into :func:`weight_buffer`, so it is read by this call's GEMM
    only); the GEMM runs in float32 or bfloat16 (see :func:`use_bf16`)."""
    if not has_choice(x):
        return F.linear(x, weight().to(x.dtype))

    def f32() -> Tensor:
        return F.linear(x, weight())

    def bf16() -> Tensor:
        return linear_bf16(x, weight())

    return bf16() if use_bf16(x, shape, f32=f32, bf16=bf16) else f32()
