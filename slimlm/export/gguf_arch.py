"""The llama architecture as llama.cpp reads it: hyper-parameters and tensor names.

llama.cpp's llama architecture holds one width for every layer (one head count, one
feed-forward length), as a transformers config does; a structurally pruned model exports
with its new uniform widths, and a layer whose shapes disagree with the config is refused.
Mistral without sliding-window attention is the same network and goes out as llama, as
llama.cpp's converter writes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.export.gguf_blocks import exact_type
from slimlm.nn import QuantLinear

SUPPORTED = "llama (LlamaForCausalLM) and mistral without sliding window (MistralForCausalLM)"
# HF block-relative names -> GGUF tensor names (llama.cpp's tensor_mapping for LLM_ARCH_LLAMA)
BLOCK_LINEARS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
BLOCK_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters the ``llama.*`` keys hold."""

    n_layers: int
    hidden: int
    ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float

    def linear_shape(self, name: str) -> tuple[int, int]:
        """``(out, in)`` of block-relative linear ``name``."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"self_attn.q_proj": (q, self.hidden), "self_attn.k_proj": (kv, self.hidden),
                "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, q),
                "mlp.gate_proj": (self.ff, self.hidden), "mlp.up_proj": (self.ff, self.hidden),
                "mlp.down_proj": (self.hidden, self.ff)}[name]  # fmt: skip


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise SlimlmError(f"rope type {kind!r} is not exported to GGUF yet; supported: default rope")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise SlimlmError("the config has no rope_theta; the checkpoint's config.json is incomplete")
    return float(theta)


def llama_shape(config: Any) -> LlamaShape:
    """The llama hyper-parameters of a transformers ``config``; other families refused in one line."""
    family = getattr(config, "model_type", None)
    if family not in ("llama", "mistral") or (family == "mistral" and getattr(config, "sliding_window", None)):
        raise SlimlmError(f"GGUF export does not support {family!r} models"
                          f"{' with sliding-window attention' if family == 'mistral' else ''}; supported: "
                          f"{SUPPORTED}")  # fmt: skip
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise SlimlmError(f"GGUF export does not support llama models with {flag}=True; supported: {SUPPORTED}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise SlimlmError(f"GGUF's llama architecture runs SiLU; this model uses {config.hidden_act!r}")
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return LlamaShape(
        n_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        ff=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        rope_theta=_rope_theta(config),
        rms_eps=float(config.rms_norm_eps),
    )


def _shape_of(obj: nn.Module | Tensor) -> tuple[int, ...]:
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    return (obj.out_features, obj.in_features)


def _checked(source: str, obj: nn.Module | Tensor, expected: tuple[int, ...]) -> nn.Module | Tensor:
    if _shape_of(obj) != expected:
        raise SlimlmError(f"{source} has shape {_shape_of(obj)} where the config implies {expected}; llama.cpp's "
                          "llama architecture holds one width for all layers (prune uniformly, or fix config.json)")
    return obj


def _one_quantized_table(embed: nn.Module, head: nn.Module) -> bool:
    """Whether ``embed`` reads the quantized ``head``'s table and a GGUF type holds that table code for code."""
    if getattr(embed, "reads", None) is None or type(head) is not QuantLinear or head.bias is not None:
        return False
    return exact_type(head.scheme, head.shape)[0] is not None and set(head.portable_tensors()) <= {
        "codes", "scale", "zero"}  # fmt: skip


def gguf_tensors(model: nn.Module, shape: LlamaShape) -> Iterator[tuple[str, str, nn.Module | Tensor, int | None]]:
    """``(GGUF name, slimlm name, module or parameter, heads to permute rows by or None)`` in file order.

    Linears come as modules (float or compressed), embeddings and norms as parameters. The
    lm_head is left out when it is the embedding's own parameter (tied).
    """
    base = model.model
    head = model.lm_head
    one_table = _one_quantized_table(base.embed_tokens, head)
    # a float table, or for an embedding reading the quantized head's table (embedding: shared) either that
    # table as the head's exact GGUF type (llama.cpp reads rows of it and, with no output.weight, multiplies by
    # it) or, where no GGUF type holds the head code for code, the table dequantized (output.weight follows)
    embed = head if one_table else base.embed_tokens.weight
    source = "lm_head" if one_table else "model.embed_tokens"
    yield "token_embd.weight", source, _checked(source, embed, (shape.vocab_size, shape.hidden)), None
    if len(base.layers) != shape.n_layers:
        raise SlimlmError(f"the model has {len(base.layers)} layers but its config says {shape.n_layers}; "
                          "the checkpoint is damaged")  # fmt: skip
    heads = {"self_attn.q_proj": shape.n_heads, "self_attn.k_proj": shape.n_kv_heads}
    for i, layer in enumerate(base.layers):
        prefix = f"model.layers.{i}"
        for hf, gg in BLOCK_NORMS.items():
            weight = layer.get_submodule(hf).weight
            yield f"blk.{i}.{gg}.weight", f"{prefix}.{hf}", _checked(f"{prefix}.{hf}", weight, (shape.hidden,)), None
        for hf, gg in BLOCK_LINEARS.items():
            source = f"{prefix}.{hf}"
            yield f"blk.{i}.{gg}.weight", source, _checked(source, layer.get_submodule(hf),
                                                           shape.linear_shape(hf)), heads.get(hf)  # fmt: skip
    yield "output_norm.weight", "model.norm", _checked("model.norm", base.norm.weight, (shape.hidden,)), None
    if not one_table and not (isinstance(head, nn.Linear) and head.weight is embed):
        yield "output.weight", "lm_head", _checked("lm_head", head, (shape.vocab_size, shape.hidden)), None
