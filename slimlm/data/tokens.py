"""Token streams, evaluation windows and calibration batches.

The text is tokenized once as one stream (documents joined by a separator)
so a window may span a document boundary, exactly as in the usual
WikiText perplexity protocol; windows are cut from the start, never overlap
and never wrap around.

Beginning of sequence: a tokenizer that starts every input with BOS (Llama,
Mistral, Gemma; see :func:`bos_id`) trained its model on inputs that begin
with it, so every evaluation window and calibration sequence is then
``[BOS] + (length - 1)`` text tokens, as in llama.cpp's perplexity tool and
lm-eval. The length stays the same; BOS is context only, never a target.
A tokenizer that adds no BOS (SmolLM2's) gets the windows it always got.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from slimlm.errors import SlimlmError

__all__ = ["bos_id", "prompt_ids", "tokenize_documents", "token_windows", "calibration_batch"]

logger = logging.getLogger(__name__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens.

    Accepts a transformers tokenizer (called with ``verbose=False`` so a
    stream longer than ``model_max_length`` does not warn: it is cut into
    windows afterwards) or a ``tokenizers.Tokenizer`` (``encode(...).ids``).
    """
    if callable(tokenizer):
        out = tokenizer(text, add_special_tokens=False, verbose=False)
        return list(out["input_ids"])
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(encoding, "ids", encoding))


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id when ``tokenizer`` starts every input with it (``tokenizer("x")`` begins with BOS), else None.

    A raw ``tokenizers.Tokenizer`` names no BOS token: None.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not callable(tokenizer):
        return None
    return bos if list(tokenizer("x").input_ids[:1]) == [bos] else None


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A generation prompt's ids as the model saw inputs in training: BOS first when the tokenizer adds it.

    A chat template that writes BOS itself (Gemma's, Mistral's) would get a
    second one from the tokenizer; the duplicate is dropped.
    """
    ids = list(tokenizer(prompt).input_ids)
    bos = bos_id(tokenizer)
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def tokenize_documents(tokenizer: Any, docs: list[str], *, separator: str = "\n\n") -> torch.Tensor:
    """All documents joined by ``separator``, tokenized once: a 1-D LongTensor of ids."""
    if not docs:
        raise SlimlmError("no documents to tokenize; pass a non-empty text source")
    ids = _encode(tokenizer, separator.join(docs))
    return torch.tensor(ids, dtype=torch.long)


def _fmt(n: int) -> str:
    return f"{n:,}"


def token_windows(tokens: torch.Tensor, *, window: int = 512, n_tokens: int | None = None,
                  bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of ``tokens``: (n_windows, window).

    With ``bos`` (see :func:`bos_id`) each window is ``bos`` followed by the
    next ``window - 1`` tokens of the stream; without it, ``window`` tokens.

    ``n_tokens=None`` takes as many whole windows as fit (a trailing partial
    window is left out). Otherwise ``n_tokens`` is rounded *up* to whole
    windows, so the windows cover ``ceil(n_tokens / window) * window`` tokens;
    a request for more than the text holds is an error, never a silent
    shortfall.
    """
    if window <= 0:
        raise SlimlmError(f"window must be a positive number of tokens, got {window}")
    if tokens.dim() != 1:
        raise SlimlmError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if bos is not None and window < 2:
        raise SlimlmError(f"window must be at least 2 tokens (BOS and one token of text), got {window}")
    step = window - (bos is not None)  # text tokens per window
    available = tokens.numel()
    fit = available // step
    if n_tokens is None:
        n_windows = fit
    elif n_tokens <= 0:
        raise SlimlmError(f"--tokens must be positive, got {n_tokens}")
    else:
        n_windows = math.ceil(n_tokens / window)
        if n_windows * window != n_tokens:
            logger.info("rounding %s tokens up to %d whole windows of %d (%s tokens)",
                        _fmt(n_tokens), n_windows, window, _fmt(n_windows * window))
    if n_windows == 0 or n_windows > fit:
        wanted = _fmt(n_windows * window) if n_tokens is not None else f"one window of {window}"
        hint = (f"pass --tokens N with N <= {_fmt(fit * window)}, or --full to use all of it"
                if fit else "use a longer text or a smaller window")
        raise SlimlmError(f"the text holds only {_fmt(available)} tokens ({fit} whole "
                          f"window{'' if fit == 1 else 's'} of {window}), fewer than the {wanted} "
                          f"requested; {hint}")
    text = tokens[: n_windows * step].view(n_windows, step)  # (n_windows, step)
    if bos is None:
        return text
    return torch.cat([text.new_full((n_windows, 1), bos), text], dim=1)  # (n_windows, window)


def calibration_batch(tokenizer: Any, docs: list[str], *, n_samples: int = 128, seq_len: int = 512,
                      seed: int = 0, name: str = "the calibration text") -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens: (n_samples, seq_len).

    Start offsets are drawn uniformly from a ``torch.Generator`` seeded with
    ``seed``, so the batch is identical for the same text and seed on every
    machine. Windows may overlap one another (as in the GPTQ reference).
    When the tokenizer adds BOS each sequence is BOS and ``seq_len - 1``
    tokens of text. ``name`` says which text a refusal is about.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise SlimlmError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    bos = bos_id(tokenizer)
    if bos is not None and seq_len < 2:
        raise SlimlmError(f"seq_len must be at least 2 tokens (BOS and one token of text), got {seq_len}")
    step = seq_len - (bos is not None)  # text tokens per sequence
    tokens = tokenize_documents(tokenizer, docs)
    available = tokens.numel()
    if available < step:
        raise SlimlmError(f"{name} holds only {_fmt(available)} tokens, fewer than one sequence of "
                          f"{step} needed for calibration; pass a longer text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, available - step + 1, (n_samples,), generator=g)  # (n_samples,)
    offsets = torch.arange(step)  # (step,)
    text = tokens[starts[:, None] + offsets[None, :]]  # (n_samples, step)
    if bos is None:
        return text
    return torch.cat([text.new_full((n_samples, 1), bos), text], dim=1)  # (n_samples, seq_len)
