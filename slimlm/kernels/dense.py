"""Float32 matmul for decode-sized inputs on CPU: oneDNN's inner product on the plain weight.

ATen sends a float32 ``F.linear`` with a few rows to MKL's GEMV/GEMM, which in
this torch build runs on one thread: 21 GB/s of weight at 2 threads where a
plain reduction over the same bytes reaches 40 GB/s (``benchmarks/kernel_speed.py``).
oneDNN's inner product splits the output rows over the intra-op threads, and
``torch.ops.mkldnn._linear_pointwise`` calls it on the ordinary (unpacked)
weight, so no second copy of the weight is kept. Measured on every float32
linear of the built-in model at 2 threads: 1.7x at one row, 2.0x at four, 1.5x
at sixteen; at 512 rows it is no faster, so large inputs keep ``F.linear``,
and so do small weights, where oneDNN's fixed cost per call (about 20 us)
outweighs the second thread.

Under ``torch.compile`` inductor cannot lower this op on an unpacked weight, and
its own GEMM for a float32 row is MKL's one-thread GEMV (the compiled float32
step of the built-in model ran at 0.74x the eager one). So a compiled graph
calls weights of at least ``MIN_WEIGHT`` elements through the opaque op
``slimlm::dense_linear``, which makes the eager choice below when it runs.

Those numbers hold for one machine: on another 2-core machine MKL's
``F.linear`` read every weight in 20.2 ms per token and oneDNN in 33.8 ms. So
the two thresholds below are only the *fixed* rule (``SLIMLM_KERNELS=fixed``);
by default each (shape, rows bucket, threads) up to 16 rows is timed once on
the machine at hand and the faster path kept (:mod:`slimlm.kernels.tune`).

The op is private to torch, so it is checked once against ``F.linear`` and
left unused when missing or wrong, and again on the operands of each measured
shape before it may win; results differ from ``F.linear`` only in the order of
float additions (about 1e-7 relative).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.kernels import tune
from slimlm.kernels.base import SELF_CHECK_TOL, relative_error

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


def _in_domain(x: Tensor, w: Tensor) -> bool:
    """Where oneDNN's inner product can stand in for ``F.linear`` at all (float32 CPU, no autograd, eager)."""
    return (x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and onednn_available())  # fmt: skip


def _onednn(rows: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``rows (M, in) -> (M, out)`` through oneDNN's inner product on the plain weight."""
    return torch.ops.mkldnn._linear_pointwise(rows, w.contiguous(), b, "none", [], "")


def _agree(y: Tensor, ref: Tensor) -> bool:
    return relative_error(y, ref) <= SELF_CHECK_TOL[torch.float32]


def _choose_onednn(rows: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether the ``(M, in)`` input ``rows`` goes through oneDNN: the fixed rule, a force or a measurement."""
    m = rows.shape[0]
    rule = m <= MAX_ROWS and w.numel() >= MIN_WEIGHT
    t = tune.tuner()
    if t.uses_rule("dense"):
        return rule
    key = tune.make_key("dense", tuple(w.shape), w.dtype, m, rows.device)
    d = t.decision(key)  # the hot path: one dict lookup
    if d is not None:
        return d.path == "onednn"

    def runs() -> tune.Runs:
        return {"f_linear": lambda: F.linear(rows, w, b), "onednn": lambda: _onednn(rows, w, b)}

    return t.choose(key, fixed="onednn" if rule else "f_linear", candidates=runs, agree=_agree) == "onednn"


def use_onednn(x: Tensor, w: Tensor, b: Tensor | None = None) -> bool:
    """Whether :func:`linear` takes the oneDNN path for this input and weight (may measure, see module doc)."""
    return _in_domain(x, w) and _choose_onednn(x.reshape(-1, x.shape[-1]).contiguous(), w, b)


@torch.library.custom_op("slimlm::dense_linear", mutates_args=())
def _dense_linear_op(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """What a compiled graph calls: :func:`linear`'s eager choice, made at run time (inputs checked when traced)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
    if not (onednn_available() and _choose_onednn(rows, w, b)):
        return F.linear(x, w, b)
    return _onednn(rows, w, b).view(*x.shape[:-1], w.shape[0])


@_dense_linear_op.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _compiled_domain(x: Tensor, w: Tensor) -> bool:
    """Under torch.compile: a float32 CPU weight large enough that oneDNN may win (decided when the op runs)."""
    return (torch.compiler.is_compiling() and x.dtype is torch.float32 and w.dtype is torch.float32
            and x.device.type == "cpu" and not torch.is_grad_enabled() and w.numel() >= MIN_WEIGHT)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``; float32 on CPU at decode sizes may go through oneDNN (see the module doc)."""
    if _compiled_domain(x, w):
        return torch.ops.slimlm.dense_linear(x, w, b)
    if not _in_domain(x, w):
        return F.linear(x, w, b)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
    if not _choose_onednn(rows, w, b):
        return F.linear(x, w, b)
    return _onednn(rows, w, b).view(*x.shape[:-1], w.shape[0])
