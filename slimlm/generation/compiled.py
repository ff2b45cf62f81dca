"""The one-token decode step under ``torch.compile``, with a clean fall back to eager.

At batch 1 a decode step of a small model is mostly framework time: 30 layers
of small ops, each a Python call and a dispatch. Compiled by inductor, the
elementwise ops fuse into generated C++ loops and, with ``cpp_wrapper``, the
calls between kernels are C++ too (no Python per op): measured on the
built-in model with int4-g64 blocks and an int8 head (2 threads,
``benchmarks/decode.py --compile``, one process) eager 72.9 tok/s, compiled
93.5, compiled with the C++ wrapper 119.7, same greedy tokens. Prefill stays
eager.

Guards: before every call dynamo checks that what the graph was traced from
still holds; by default that includes every attribute of every module the
decoder reaches (hundreds of layout tensors and flags): 1.1 ms of a 9.3 ms
step under the profiler. A decoder is a snapshot of its model (its fused
weights are copies, its layer list is built once), so the step keeps only the
guards on its inputs (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``):
new shapes, batch sizes or cache layouts still recompile, but a module changed
after the first compiled step is not noticed -- build a new decoder and step
then. Each step compiles its own copy of the call's code (dynamo keeps
graphs per code object), so that without those guards one decoder's graph is
never picked for another. Measured (int4-head8, 512-token prompt, 2 threads,
one process, same greedy tokens as eager): 105.8 -> 125.3 tok/s.
``module_guards=True`` keeps the module guards.

The compile cost (1-1.5 minutes cold on 2 cores, ~17 s warm) is paid once
per machine: inductor caches compiled code on disk
(``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``), so a
later process re-traces but does not re-compile. A compiler that is missing
or fails (no C++ toolchain, an op inductor cannot lower) is not an error:
the step logs one warning with the reason and runs eagerly from then on
(``CompiledStep.failed`` says why).
"""

from __future__ import annotations

import logging
import types
from typing import Any, Callable

import torch
from torch import Tensor, nn

log = logging.getLogger("slimlm.generation")


class CompiledStep:
    """``step(ids (B, T), positions (B, T), cache) -> logits``: the decoder compiled, or eager after a failure."""

    def __init__(self, decoder: nn.Module, *, cpp_wrapper: bool | None = None, backend: Any = "inductor",
                 module_guards: bool = False) -> None:  # fmt: skip
        self.decoder = decoder
        device = next(decoder.parameters()).device
        self.cpp_wrapper = device.type == "cpu" if cpp_wrapper is None else cpp_wrapper
        options: dict[str, Any] = {"cpp_wrapper": True} if self.cpp_wrapper and backend == "inductor" else {}
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
        target: Any = decoder
        if not module_guards and skip is not None:  # the module docstring says why
            options["guard_filter_fn"] = skip
            target = _own_frame(decoder)
        self._compiled = torch.compile(target, dynamic=True, backend=backend, options=options or None)
        self.failed: str | None = None  # why the compiled step was given up, if it was
        self._warmed = False

    def __call__(self, ids: Tensor, positions: Tensor, cache: Any, **kw: Any) -> Tensor:
        if self.failed is not None:
            return self.decoder(ids, positions, cache, **kw)
        if not self._warmed:  # the first step runs eagerly: per-shape kernel choices are measured outside the
            self._warmed = True  # trace (nothing can be timed while tracing) and then traced as made
            return self.decoder(ids, positions, cache, **kw)
        length = getattr(cache, "length", None)
        try:
            return self._compiled(ids, positions, cache, **kw)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager step still answers
            self.failed = failure_reason(e)
            log.warning("torch.compile of the decode step failed (%s); decoding eagerly", self.failed)
            if length is not None and cache.length != length:  # a graph ran before the failure: undo its slots
                cache.crop(length)
            return self.decoder(ids, positions, cache, **kw)


def _own_frame(decoder: nn.Module) -> Callable[..., Tensor]:
    """``decoder``'s call through a function with a code object of its own.

    Dynamo keeps its compiled graphs per code object and picks one by its guards. Without the module guards
    nothing tells two decoders of one class apart (same input shapes, same ``forward``), so one decoder's graph
    would run for another; a fresh code object (``code.replace()`` copies it) gives every step its own cache.
    """

    def call(ids: Tensor, positions: Tensor, cache: Any, **kw: Any) -> Tensor:
        return decoder(ids, positions, cache, **kw)

    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, call.__defaults__,
                              call.__closure__)  # fmt: skip


def failure_reason(e: BaseException) -> str:
    """One line: the innermost cause (dynamo wraps a backend's error in BackendCompilerFailed)."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = inner
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def compile_step(decoder: nn.Module, *, cpp_wrapper: bool | None = None, module_guards: bool = False) -> CompiledStep:
    """The decoder under ``torch.compile`` for the one-token steps (pass as ``step=``); see the module docstring.

    ``cpp_wrapper`` (default: on for CPU) emits the calls between kernels as C++. Dynamic shapes: the cache
    view grows every step, and one graph serves every length. ``module_guards=False`` (default): the decoder's
    modules are not re-checked before each step (build a new step after changing them)."""
    return CompiledStep(decoder, cpp_wrapper=cpp_wrapper, module_guards=module_guards)
