import torch
from torch import nn

from slimlm.models.tiny import tiny_model


def varied_tiny(family: str, seed: int = 0):
    """A tiny model whose greedy output does not just repeat its input.

    With tied embeddings a random tiny model's top logit is the current
    token; an independent random lm_head makes greedy continuations vary,
    so token-for-token comparisons mean something.
    """
    model = tiny_model(family, seed=seed)
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(seed + 1)
    head.weight = nn.Parameter(torch.randn(head.weight.shape, generator=g) * 0.5)
    model.config.tie_word_embeddings = False
    return model
