"""llama.cpp through llama-cpp-python for the engines benchmarks: load a GGUF, time greedy decodes, quantize.

llama-cpp-python is optional (``scripts/setup-llamacpp.sh``) and imported only inside these functions.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from pathlib import Path

import numpy as np


def llama_model(path: Path, *, n_ctx: int, threads: int, logits_all: bool):
    """A ``llama_cpp.Llama`` over the GGUF at ``path``: one batch the size of the context, quiet."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: run scripts/setup-llamacpp.sh") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)  # fmt: skip


class LlamaCppLoop:
    """llama.cpp's greedy decode of one GGUF, timed like ``measure_speed``: prefill, then ``n - 1`` steps."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int) -> None:
        self.llm = llama_model(path, n_ctx=n_ctx, threads=threads, logits_all=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax_last(self) -> int:
        import llama_cpp

        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def warm_up(self, prompt: list[int]) -> None:
        """One short untimed run (the first one pays for allocation and page faults)."""
        self.run(prompt[:32], 8)

    def run(self, ids: list[int], n: int) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) of ``ids`` and ``n`` greedy tokens from an empty cache."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        nxt = self._argmax_last()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([nxt])
            nxt = self._argmax_last()
        return len(ids) / (t1 - t0), (n - 1) / (time.perf_counter() - t1)

    def close(self) -> None:
        self.llm.close()


def llamacpp_speed(path: Path, prompt: list[int], *, new_tokens: int, threads: int, runs: int) -> dict[str, float]:
    """Medians of ``runs`` timed greedy decodes in llama.cpp after a warm-up."""
    loop = LlamaCppLoop(path, n_ctx=len(prompt) + new_tokens, threads=threads)
    loop.warm_up(prompt)
    prefill, decode = zip(*(loop.run(prompt, new_tokens) for _ in range(runs)))
    loop.close()
    return dict(prefill_tok_s=statistics.median(prefill), decode_tok_s=statistics.median(decode))


def llamacpp_quantize(src: Path, dst: Path, ftype: str, *, threads: int) -> None:
    """llama.cpp's quantization of ``src`` to ``ftype`` (e.g. "Q4_K_M"), default parameters, written atomically."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    os.replace(tmp, dst)
