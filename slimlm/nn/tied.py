"""Breaking the tie between the input embedding and the output projection when the head is swapped.

Models such as SmolLM2 tie ``lm_head.weight`` to the embedding table: one
float matrix (V, d) serves both the lookup (one row per token) and the last
matmul (the whole table per decoded token). Swapping the head for a runtime
module (a quantized head) leaves the embedding a float lookup table and gives
the head its own stored form, so the two are no longer one tensor and the
model must say so: ``config.tie_word_embeddings`` becomes False (in the text
config too), and transformers' own tie map forgets the head, so that a saved
checkpoint reloads untied and nothing re-ties the head to the table later
(``model.tie_weights()`` would otherwise hang the embedding on the new module).

What it costs and buys, logged once: the checkpoint stores the head a second
time (+ its stored bytes), and a decode step reads the stored head plus one
embedding row instead of the whole float table.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("slimlm.nn")

MB = 1e6


def shared_embedding(model: nn.Module, old: nn.Module | None, new: nn.Module) -> nn.Embedding | None:
    """The input embedding whose weight ``old`` (the output projection) shares and ``new`` does not, else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if old is None or get_in is None or get_out is None:
        return None
    try:
        emb, head = get_in(), get_out()
    except NotImplementedError:  # a transformers model without one of the two
        return None
    weight = dict(emb.named_parameters(recurse=False)).get("weight")  # a table read from elsewhere has none
    if old is not head or weight is None or getattr(old, "weight", None) is not weight:
        return None
    if any(p is weight for p in new.parameters()):  # a wrapper that keeps the shared weight inside
        return None
    return emb


def stored_bytes(module: nn.Module) -> int:
    """Bytes ``module``'s weights are stored in: its packed form when it reports one, else its parameters."""
    if hasattr(module, "weight_storage"):
        return int(module.weight_storage()[1])
    return sum(p.numel() * p.element_size() for p in module.parameters())


def untie_head(model: nn.Module, name: str, emb: nn.Embedding, new: nn.Module) -> None:
    """Record that the head at ``name`` (now ``new``) no longer shares ``emb``'s weight, and log the cost."""
    config = getattr(model, "config", None)
    if config is not None:
        configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
        for cfg in configs:
            cfg.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers' {target: source} map used by tie_weights
    if isinstance(tied, dict):
        for key in [k for k in tied if k.startswith(f"{name}.")]:
            del tied[key]
    W = emb.weight  # (V, d)
    table, row, head = W.numel() * W.element_size(), W.shape[-1] * W.element_size(), stored_bytes(new)
    emb_name = next((n for n, m in model.named_modules() if m is emb), "the input embedding")
    log.info("untied %s from %s (the embedding stays a float lookup table): +%.1f MB on disk, %+.1f MB read "
             "per token", name, emb_name, head / MB, (head + row - table) / MB)  # fmt: skip
