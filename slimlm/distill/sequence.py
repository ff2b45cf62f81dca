"""Sequence-level knowledge distillation: train the student on the teacher's own continuations.

Kim & Rush 2016, "Sequence-Level Knowledge Distillation" (arXiv:1606.07947):
instead of matching the teacher's per-token distributions on given text, the
student is trained with plain next-token cross-entropy on the sequences the
teacher generates (beam search there, greedy here; sampling optional), an
approximation of the teacher's sequence distribution by its mode.

:func:`teacher_sequences` writes that data with slimlm's decode loop
(:func:`slimlm.generation.generate` over :func:`~slimlm.generation.make_decoder`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.generation import GenerationConfig, Sampling, generate, make_decoder

log = logging.getLogger("slimlm.distill")

__all__ = ["teacher_sequences"]


def teacher_sequences(teacher: nn.Module, prompts: Tensor, *, new_tokens: int, temperature: float = 0.0,
                      top_p: float | None = None, seed: int = 0, batch_size: int = 8) -> Tensor:
    """``prompts (N, P)`` long -> ``(N, P + new_tokens)``: each row continued by the teacher.

    Temperature 0 is greedy (``top_p`` unused); otherwise batch b samples from a generator seeded with
    ``seed + b``. Fixed length: the decode loop stops a row only at a stop token, and none is given, so an
    EOS is kept as an ordinary token and every row gets exactly ``new_tokens`` new ones (checked).
    The teacher is put in eval mode (no dropout); decoding runs under no_grad.
    """
    if prompts.dim() != 2 or min(prompts.shape) < 1 or prompts.dtype != torch.long:
        raise SlimlmError(f"prompts must be a (N, P) long tensor with N, P >= 1, got {tuple(prompts.shape)} "
                          f"{prompts.dtype}")  # fmt: skip
    if new_tokens < 1 or batch_size < 1:
        raise SlimlmError(f"new_tokens and batch_size must be >= 1, got {new_tokens} and {batch_size}")
    decoder = make_decoder(teacher.eval())
    rows = prompts.tolist()  # the loop takes lists of ids
    out = []
    starts = range(0, len(rows), batch_size)
    for b, start in enumerate(tqdm(starts, desc="teacher sequences", unit="batch", leave=False)):
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed + b)
        cfg = GenerationConfig(max_new_tokens=new_tokens, sampling=sampling, stop_tokens=())
        chunk = rows[start:start + batch_size]
        new = generate(decoder, chunk, cfg, batch_size=len(chunk))  # N_b lists of new ids
        if any(len(r) != new_tokens for r in new):
            raise SlimlmError(f"the decode loop returned {sorted({len(r) for r in new})} new tokens per row, "
                              f"expected {new_tokens}; this is a bug in slimlm.generation")  # fmt: skip
        out.append(torch.tensor(new, dtype=torch.long))  # (N_b, new_tokens)
    log.info("teacher continued %d prompts of %d tokens by %d tokens", len(rows), prompts.shape[1], new_tokens)
    return torch.cat([prompts, torch.cat(out).to(prompts.device)], dim=1)  # (N, P + new_tokens)
