"""Token streams, evaluation windows and calibration batches.

The text is tokenized once as one stream (documents joined by a separator)
so a window may span a document boundary, exactly as in the usual
WikiText perplexity protocol; windows are cut from the start, never overlap
and never wrap around.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from slimlm.errors import SlimlmError

__all__ = ["tokenize_documents", "token_windows", "calibration_batch"]

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


def tokenize_documents(tokenizer: Any, docs: list[str], *, separator: str = "\n\n") -> torch.Tensor:
    """All documents joined by ``separator``, tokenized once: a 1-D LongTensor of ids."""
    if not docs:
        raise SlimlmError("no documents to tokenize; pass a non-empty text source")
    ids = _encode(tokenizer, separator.join(docs))
    return torch.tensor(ids, dtype=torch.long)


def _fmt(n: int) -> str:
    return f"{n:,}"


def token_windows(tokens: torch.Tensor, *, window: int = 512, n_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of ``tokens``: (n_windows, window).

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
    available = tokens.numel()
    fit = available // window
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
    return tokens[: n_windows * window].view(n_windows, window)  # (n_windows, window)


def calibration_batch(tokenizer: Any, docs: list[str], *, n_samples: int = 128, seq_len: int = 512,
                      seed: int = 0, name: str = "the calibration text") -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens: (n_samples, seq_len).

    Start offsets are drawn uniformly from a ``torch.Generator`` seeded with
    ``seed``, so the batch is identical for the same text and seed on every
    machine. Windows may overlap one another (as in the GPTQ reference).
    ``name`` says which text a refusal is about.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise SlimlmError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    tokens = tokenize_documents(tokenizer, docs)
    available = tokens.numel()
    if available < seq_len:
        raise SlimlmError(f"{name} holds only {_fmt(available)} tokens, fewer than one sequence of "
                          f"{seq_len} needed for calibration; pass a longer text")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, available - seq_len + 1, (n_samples,), generator=g)  # (n_samples,)
    offsets = torch.arange(seq_len)  # (seq_len,)
    return tokens[starts[:, None] + offsets[None, :]]  # (n_samples, seq_len)
