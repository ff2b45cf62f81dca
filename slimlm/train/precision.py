"""Training precision: fp32, or the forward and loss under bf16 autocast, measured once per machine.

Under ``bf16`` the forward and the loss run in :func:`torch.autocast` with
``dtype=torch.bfloat16`` (matmuls in bf16, reductions and the weights, their
gradients and AdamW's moments in fp32: mixed precision as in Micikevicius et
al. 2018, arXiv:1710.03740, with bf16's fp32 exponent range so no loss
scaling). Whether that is faster depends on the hardware: on a GPU with bf16
tensor cores it roughly halves the matmul time, on a CPU without native bf16
(AVX2, no ``avx512_bf16``/AMX) every bf16 matmul is emulated and a step can
be ten times slower. So ``auto`` does not guess: it times a forward and
backward of one linear layer shaped like the model's, ``(512, H) @ (H, 4H)``,
in both precisions on the params' device, and takes bf16 only when it is at
least :data:`BF16_MARGIN` faster (a tie keeps the exact arithmetic). The
choice is cached per process per (device type, thread count, H) and logged
with both timings. Below :data:`MIN_HIDDEN` (test-sized models) a step is
overhead-bound, the timings are noise, and fp32 is kept without measuring,
so a tiny model trains the same numbers on every machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger("slimlm.train")

PRECISIONS = ("fp32", "bf16", "auto")
BF16_MARGIN = 0.9  # bf16 must take under 90% of fp32's time to be chosen
ROWS, REPS = 512, 3  # the micro-benchmark: (ROWS, H) @ (H, 4H), the fastest of REPS calls after one warm-up
MIN_HIDDEN = 256  # smaller H: fp32, unmeasured

Timer = Callable[[Callable[[], Tensor], int], float]  # (call, reps) -> seconds per call

__all__ = ["BF16_MARGIN", "MIN_HIDDEN", "PRECISIONS", "PrecisionChoice", "autocast", "choose_precision",
           "seconds_per_call"]  # fmt: skip


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in and, when ``auto`` chose it, the timings it chose on."""

    precision: str  # "fp32" or "bf16"
    fp32_s: float | None = None  # micro-benchmark seconds per call; None when the precision was given
    bf16_s: float | None = None


_CHOICES: dict[tuple[str, int, int], PrecisionChoice] = {}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The context a forward and loss run in: bf16 autocast on ``device``'s type, or a disabled one."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seconds_per_call(call: Callable[[], Tensor], reps: int) -> float:
    """Wall seconds of the fastest of ``reps`` calls after one warm-up (robust to a busy machine's pauses).

    ``.item()`` on the returned scalar waits for the device to finish."""
    call().item()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call().item()
        times.append(time.perf_counter() - t0)
    return min(times)


def _linear_step(device: torch.device, H: int, precision: str) -> Callable[[], Tensor]:
    """Forward and backward of ``x (ROWS, H) @ W (H, 4H)`` in ``precision``; returns a scalar to wait on."""
    gen = torch.Generator().manual_seed(0)  # its own generator: the global RNG is the run's
    x = torch.randn(ROWS, H, generator=gen).to(device)
    W = (torch.randn(H, 4 * H, generator=gen) / H**0.5).to(device).requires_grad_(True)

    def call() -> Tensor:
        W.grad = None
        with torch.enable_grad(), autocast(device, precision):
            y = (x @ W).float().square().mean()  # (ROWS, 4H) -> scalar
        y.backward()
        return W.grad[0, 0]

    return call


def _hidden_size(params: Sequence[Tensor]) -> int:
    """H of the model's linears: the smaller side of the first 2-D parameter (256 when there is none)."""
    return next((min(p.shape) for p in params if p.dim() == 2), 256)


def choose_precision(requested: str, params: Sequence[Tensor], *, timer: Timer = seconds_per_call) -> PrecisionChoice:
    """``requested`` as given, or for ``auto`` the faster of fp32 and bf16 autocast on ``params``' device."""
    if requested != "auto":
        return PrecisionChoice(requested)
    device, H = params[0].device, _hidden_size(params)
    if H < MIN_HIDDEN:
        return PrecisionChoice("fp32")
    key = (device.type, torch.get_num_threads(), H)
    if key not in _CHOICES:
        fp32 = timer(_linear_step(device, H, "fp32"), REPS)
        bf16 = timer(_linear_step(device, H, "bf16"), REPS)
        choice = PrecisionChoice("bf16" if bf16 < BF16_MARGIN * fp32 else "fp32", fp32, bf16)
        log.info("precision auto on %s (%d threads, (%d, %d) @ (%d, %d) forward+backward): fp32 %.4f s, "
                 "bf16 autocast %.4f s -> %s", device.type, key[1], ROWS, H, H, 4 * H, fp32, bf16,
                 choice.precision)  # fmt: skip
        _CHOICES[key] = choice
    return _CHOICES[key]
