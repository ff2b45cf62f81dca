"""Float32 matmul for decode-sized inputs on CPU: oneDNN's inner product on the plain weight.

ATen sends a float32 ``F.linear`` with a few rows to MKL's GEMV/GEMM, which in
this torch build runs on one thread: 21 GB/s of weight at 2 threads where a
plain reduction over the same bytes reaches 40 GB/s (``benchmarks/kernels.py``).
oneDNN's inner product splits the output rows over the intra-op threads, and
``torch.ops.mkldnn._linear_pointwise`` calls it on the ordinary (unpacked)
weight, so no second copy of the weight is kept. Measured on every float32
linear of the built-in model at 2 threads: 1.7x at one row, 2.0x at four, 1.5x
at sixteen; at 512 rows it is no faster, so large inputs keep ``F.linear``,
and so do small weights, where oneDNN's fixed cost per call (about 20 us)
outweighs the second thread.

Under ``torch.compile`` the plain ``F.linear`` is traced (inductor cannot lower
this op on an unpacked weight and picks its own GEMM).

The op is private to torch, so it is checked once against ``F.linear`` and
left unused when missing or wrong; results differ from ``F.linear`` only in the
order of float additions (about 1e-7 relative).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("slimlm.kernels")

MAX_ROWS = 16  # inputs with more rows than this use F.linear
MIN_WEIGHT = 1 << 18  # weights with fewer elements (1 MB in float32) use F.linear: oneDNN's call costs more


@functools.cache
def onednn_available() -> bool:
    """True when oneDNN's inner product runs here and matches ``F.linear`` on a small probe."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 40), (24, 40), (24,)))
    try:
        with torch.no_grad():
            got = op(x, w, b, "none", [], "")
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
        log.info("oneDNN linear unavailable (%s); using F.linear", e)
        return False
    return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5))


def use_onednn(x: Tensor, w: Tensor) -> bool:
    """Whether :func:`linear` takes the oneDNN path for this input and weight."""
    return (x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and x.numel() <= MAX_ROWS * x.shape[-1] and w.numel() >= MIN_WEIGHT
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and onednn_available())


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``; float32 on CPU with at most ``MAX_ROWS`` rows goes through oneDNN."""
    if not use_onednn(x, w):
        return F.linear(x, w, b)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, w.contiguous(), b, "none", [], "")
    return y.view(*x.shape[:-1], w.shape[0])
