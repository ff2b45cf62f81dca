"""A few generated samples per model, so a report can set base and compressed text side by side.

Fixed prompts, greedy decoding, 40 new tokens, through slimlm's own decode
loop (``slimlm.generation``): the same prompts and decoding for the base and
every job, so differences come from the weights alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slimlm.fsutil import atomic_write_text
from slimlm.generation import generate_text

SCHEMA = "slimlm.samples/1"
NEW_TOKENS = 40
PROMPTS = (
    "The capital of France is",
    "In mathematics, a prime number is",
    "def fibonacci(n):",
)


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer: Any, *, prompts: tuple[str, ...] = PROMPTS,
                     max_new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """``{"schema": "slimlm.samples/1", "samples": [{"prompt", "text"}, ...]}``, greedy."""
    samples = [{"prompt": p, "text": "".join(generate_text(model, tokenizer, p, max_new_tokens=max_new_tokens))}
               for p in prompts]  # fmt: skip
    return {"schema": SCHEMA, "samples": samples}


def write_samples(path: str | Path, doc: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
