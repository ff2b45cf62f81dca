"""What an export costs: the exported file loaded back by an independent reader, scored against the checkpoint.

Used after ``export_gguf(..., requantize=TYPE)`` re-rounds weights that no GGUF type holds code for code:
the GGUF is read back by transformers' GGUF loader (dequantized to float) and its next-token
distributions are compared with the checkpoint's own (slimlm's modules) on the protocol's evaluation
windows: mean KL(checkpoint || export) per token, over the full vocabulary.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.eval.protocol import for_tokenizer, get_protocol
from slimlm.eval.runner import eval_tokens, eval_windows
from slimlm.io import load_compressed
from slimlm.models import load_model


@torch.inference_mode()
def mean_kld(reference: nn.Module, other: nn.Module, windows: Tensor) -> float:
    """Mean per-position KL(reference || other) over ``windows`` (W, T) -> float (nats)."""
    total, count = 0.0, 0
    for w in windows:
        logp = F.log_softmax(reference(input_ids=w[None]).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        logq = F.log_softmax(other(input_ids=w[None]).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        total += (logp.exp() * (logp - logq)).sum().item()
        count += logp.shape[0]
    return total / count


def export_kld(checkpoint: str | os.PathLike, gguf_file: str | os.PathLike, *, protocol: str = "wiki-v1",
               n_tokens: int = 2048) -> tuple[float, int]:  # fmt: skip
    """(KL of the GGUF read back against the checkpoint, tokens scored) on ``n_tokens`` evaluation tokens."""
    model, tokenizer = load_compressed(checkpoint)
    exported, _ = load_model(gguf_file)
    proto = for_tokenizer(get_protocol(protocol), tokenizer)
    windows = eval_windows(eval_tokens(tokenizer, proto), proto, n_tokens=n_tokens, full=False)
    return mean_kld(model, exported, windows), windows.numel()
