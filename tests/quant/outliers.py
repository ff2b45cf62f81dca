"""Tiny models with LLM-like activation outlier channels, injected without changing their function."""

import torch

from slimlm.models.tiny import tiny_model

IDS = torch.arange(5, 5 + 4 * 32).reshape(4, 32) % 500 + 4  # (4, 32) token ids
CALIB = (torch.arange(8 * 32).reshape(8, 32) * 7919) % 500 + 4  # (8, 32), other tokens


@torch.no_grad()
def outlier_llama(factor: float = 40.0, channels=(3, 17, 42)) -> torch.nn.Module:
    """A tiny llama whose norm outputs and down_proj inputs carry a few channels ``factor`` x larger.

    Norm weight j times f and the reading linears' column j divided by f (up_proj row j times f and
    down_proj column j divided by f) leave the float function as it was: only the activations change."""
    model = tiny_model("llama")
    idx = torch.tensor(channels)
    for layer in model.model.layers:
        for norm, lins in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                           (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):  # fmt: skip
            norm.weight[idx] *= factor
            owner = layer.self_attn if lins[0] == "q_proj" else layer.mlp
            for name in lins:
                getattr(owner, name).weight[:, idx] /= factor
        layer.mlp.up_proj.weight[idx, :] *= factor
        layer.mlp.down_proj.weight[:, idx] /= factor
    return model


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())
