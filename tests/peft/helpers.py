"""Shared by the PEFT tests: a tiny llama and text it can learn in a few steps."""

from __future__ import annotations

import torch

from slimlm.models.tiny import tiny_model

FAST = dict(steps=6, batch_size=4, seq_len=32, warmup=0, precision="fp32", schedule="constant", log_every=100)


def learnable_calib(n: int = 8, length: int = 32, *, seed: int = 0) -> torch.Tensor:
    """(n, length) ids: each row counts up from a random start by 1 mod 60 (+4): next token is predictable."""
    starts = torch.randint(0, 60, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(length)) % 60 + 4  # (n, length)


def model(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_model("llama", seed=seed)


def snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict, cloned, keys with peft's ``.base_layer`` taken out."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in m.state_dict().items()}
