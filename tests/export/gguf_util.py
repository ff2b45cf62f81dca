"""Shared by the GGUF export tests: tiny checkpoints, and an independent reading of GGUF blocks.

The block decoder here is written from ggml's block layouts (not from slimlm's packer), so a
packing bug shows as a mismatch of codes or scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from slimlm.api import apply
from slimlm.io import save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.quant import RTN

IDS = torch.arange(3, 35).reshape(1, 32)
SAMPLE = "The quick brown fox, 0123 jumps over the lazy dog!\nCompression makes models smaller."
# GGUF name -> (HF block-relative name, heads whose permutation to undo: "q", "kv" or None)
LINEARS = {"attn_q": ("self_attn.q_proj", "q"), "attn_k": ("self_attn.k_proj", "kv"),
           "attn_v": ("self_attn.v_proj", None), "attn_output": ("self_attn.o_proj", None),
           "ffn_gate": ("mlp.gate_proj", None), "ffn_up": ("mlp.up_proj", None),
           "ffn_down": ("mlp.down_proj", None)}  # fmt: skip


def checkpoint(tmp_path: Path, scheme, *, model=None, name: str = "ckpt", add_bos: bool = False, **rtn) -> Path:
    model = tiny_model("llama") if model is None else model
    if scheme is not None:
        apply(model, RTN(scheme=scheme, **rtn))
    tok = tiny_tokenizer(model.config.vocab_size, add_bos=add_bos)
    return save_compressed(model, tok, tmp_path / name, base_model="tiny")


def unpermute(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order, as transformers' GGUF loader does: (H, D/2, 2) -> (H, 2, D/2)."""
    D = x.shape[0] // n_heads
    return x.reshape(n_heads, D // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def decode_blocks(raw: np.ndarray, qtype: QT, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(q (out, in) int GGUF codes, d (out, nb) float16, m (out, nb) float16 or None)`` from raw block bytes."""
    size = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20, QT.Q5_0: 22, QT.Q5_1: 24}[qtype]
    b = np.ascontiguousarray(raw).reshape(-1, size)  # (N, bytes)
    d = b[:, 0:2].copy().view(np.float16)[:, 0]
    pos, m = 2, None
    if qtype in (QT.Q4_1, QT.Q5_1):
        m, pos = b[:, 2:4].copy().view(np.float16)[:, 0], 4
    if qtype == QT.Q8_0:
        q = b[:, 2:].copy().view(np.int8).astype(np.int32)
    else:
        high = np.zeros((b.shape[0], 32), dtype=np.int32)
        if qtype in (QT.Q5_0, QT.Q5_1):
            word = b[:, pos:pos + 4].copy().view("<u4")[:, 0].astype(np.int64)
            high = np.stack([(word >> j) & 1 for j in range(32)], axis=1).astype(np.int32) << 4
            pos += 4
        qs = b[:, pos:pos + 16].astype(np.int32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1) | high
    nb = b.shape[0] // out
    return q.reshape(out, -1), d.reshape(out, nb), None if m is None else m.reshape(out, nb)
