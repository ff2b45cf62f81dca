"""Architecture knowledge as data: one ``Adapter`` per model family.

An adapter says where the decoder blocks live, which linears inside a block
read the same input (and which norm produces that input), the head layout
attribute names in the config, and where the final norm, embeddings and
lm_head are. Algorithms (GPTQ, AWQ, SmoothQuant, Wanda, ...) read this table
instead of writing ``isinstance`` chains per family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class LinearGroup:
    """Linears (paths relative to a block) that all read one input tensor.

    ``norm`` is the block-relative path of the norm whose output is that
    input, or None when the input is not a norm output (o_proj, down_proj).
    """

    norm: str | None
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Producer:
    """The linear whose output is the input of a group without a norm (block-relative names).

    AWQ and SmoothQuant fold ``1/s`` into its output rows (:mod:`slimlm.quant.fold`).
    """

    linear: str
    parts: int = 1  # its output stacks ``parts`` equal slices (fused qkv: 3); the consumer reads the last
    # What sits in between: "channels" = elementwise ops, which commute with a positive per-channel
    # scale (gate product, ReLU); "heads" = attention, which mixes tokens, not channels (under GQA a
    # scale must be shared by the query heads of one kv head).
    through: str = "channels"
    relu: str | None = None  # an activation module in between; a scale passes it only if it is nn.ReLU


@dataclass(frozen=True)
class HeadLayout:
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Adapter:
    """Where things are in one model family (paths are dotted module paths)."""

    family: str
    blocks: str  # the decoder-block nn.ModuleList, from the top model
    groups: tuple[LinearGroup, ...]
    final_norm: str | None
    embeddings: tuple[str, ...]  # token embedding first, then position embeddings
    lm_head: str
    # "linear": nn.Linear, weight (out, in). "conv1d": transformers Conv1D,
    # weight (in, out) -- transpose before treating it as a Linear weight.
    linear_kind: str = "linear"
    norm_kind: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    # Gemma norms compute x_hat * (1 + w): folding a scale s into the norm
    # means w' = (1 + w) * s - 1, not w * s.
    norm_weight_offset: float = 0.0
    # Linears packing several projections into one output ("qkv", "gate_up").
    fused: tuple[str, ...] = ()
    # Config attribute names (on the text config, see ``text_config``).
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"  # None: no GQA, kv = heads
    head_dim_attr: str | None = "head_dim"  # None or missing: hidden // heads
    hidden_attr: str = "hidden_size"
    n_layers_attr: str = "num_hidden_layers"
    # Multimodal configs keep the language model's numbers in a sub-config.
    text_config: str | None = None
    # Config flag that, when False, makes the family post-norm (OPT-350m):
    # the norms then follow the linears, so no norm feeds a group.
    pre_norm_flag: str | None = None
    # Groups without a norm: consumer linear -> the linear producing its input (AWQ, SmoothQuant).
    producers: tuple[tuple[str, Producer], ...] = ()
    # -- slimlm.generation: the lean decoder (generation/decoder.py) --
    # The lean llama-like forward runs this family (same block layout as llama, RMSNorm, rotary).
    fast_decoder: bool = False
    # ``config.sliding_window`` applies to every layer (Mistral), not only to layers typed
    # "sliding_attention" in ``config.layer_types``.
    sliding_window_all_layers: bool = False
    # Config flags (on the text config) that give block linears a bias, with the block-relative linears
    # each one covers, all or none (LlamaConfig.attention_bias: q/k/v/o_proj). BitFit's zero_biases sets them.
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    def producer(self, linear: str) -> Producer | None:
        """The producer of block-relative ``linear``'s input, None if it is not a linear's output."""
        return dict(self.producers).get(linear)


def _llama_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[LinearGroup, ...]:
    return (
        LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup(None, ("self_attn.o_proj",)),
        LinearGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup(None, ("mlp.down_proj",)),
    )


_LLAMA_PRODUCERS = (
    ("self_attn.o_proj", Producer("self_attn.v_proj", through="heads")),
    ("mlp.down_proj", Producer("mlp.up_proj")),  # act(gate) * up is elementwise
)


_ATTENTION_BIAS = ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
_MLP_BIAS = ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def _llama_like(family: str, **kw) -> Adapter:
    base = dict(
        family=family,
        blocks="model.layers",
        groups=_llama_groups(),
        final_norm="model.norm",
        embeddings=("model.embed_tokens",),
        lm_head="lm_head",
        producers=_LLAMA_PRODUCERS,
    )
    base.update(kw)
    return Adapter(**base)


# Gemma 2/3 put an extra norm on the attention output (post_attention_layernorm);
# the MLP is fed by pre_feedforward_layernorm.
_GEMMA2_GROUPS = _llama_groups(mlp_norm="pre_feedforward_layernorm")

ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama", fast_decoder=True, bias_flags=(_ATTENTION_BIAS, _MLP_BIAS)),
    "mistral": _llama_like("mistral", fast_decoder=True, sliding_window_all_layers=True),
    "qwen2": _llama_like("qwen2", fast_decoder=True),
    "qwen3": _llama_like("qwen3", fast_decoder=True, bias_flags=(_ATTENTION_BIAS,)),
    "gemma": _llama_like("gemma", norm_weight_offset=1.0, fast_decoder=True, bias_flags=(_ATTENTION_BIAS,)),
    "gemma2": _llama_like("gemma2", groups=_GEMMA2_GROUPS, norm_weight_offset=1.0, bias_flags=(_ATTENTION_BIAS,)),
    "gemma3_text": _llama_like("gemma3_text", groups=_GEMMA2_GROUPS, norm_weight_offset=1.0,
                               bias_flags=(_ATTENTION_BIAS,)),
    "gemma3": _llama_like(
        "gemma3",
        blocks="model.language_model.layers",
        groups=_GEMMA2_GROUPS,
        final_norm="model.language_model.norm",
        embeddings=("model.language_model.embed_tokens",),
        norm_weight_offset=1.0,
        text_config="text_config",
        bias_flags=(_ATTENTION_BIAS,),
    ),
    "phi3": _llama_like(
        "phi3",
        groups=(
            LinearGroup("input_layernorm", ("self_attn.qkv_proj",)),
            LinearGroup(None, ("self_attn.o_proj",)),
            LinearGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
            LinearGroup(None, ("mlp.down_proj",)),
        ),
        fused=("self_attn.qkv_proj", "mlp.gate_up_proj"),
        producers=(
            ("self_attn.o_proj", Producer("self_attn.qkv_proj", parts=3, through="heads")),
            ("mlp.down_proj", Producer("mlp.gate_up_proj", parts=2)),
        ),
    ),
    "opt": Adapter(
        family="opt",
        blocks="model.decoder.layers",
        groups=(
            LinearGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            LinearGroup(None, ("self_attn.out_proj",)),
            LinearGroup("final_layer_norm", ("fc1",)),
            LinearGroup(None, ("fc2",)),
        ),
        final_norm="model.decoder.final_layer_norm",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        lm_head="lm_head",
        norm_kind="layernorm",
        n_kv_heads_attr=None,
        head_dim_attr=None,
        pre_norm_flag="do_layer_norm_before",
        producers=(
            ("self_attn.out_proj", Producer("self_attn.v_proj", through="heads")),
            ("fc2", Producer("fc1", relu="activation_fn")),
        ),
    ),
    "gpt2": Adapter(
        family="gpt2",
        blocks="transformer.h",
        groups=(
            LinearGroup("ln_1", ("attn.c_attn",)),
            LinearGroup(None, ("attn.c_proj",)),
            LinearGroup("ln_2", ("mlp.c_fc",)),
            LinearGroup(None, ("mlp.c_proj",)),
        ),
        final_norm="transformer.ln_f",
        embeddings=("transformer.wte", "transformer.wpe"),
        lm_head="lm_head",
        linear_kind="conv1d",
        norm_kind="layernorm",
        fused=("attn.c_attn",),
        n_heads_attr="n_head",
        n_kv_heads_attr=None,
        head_dim_attr=None,
        hidden_attr="n_embd",
        n_layers_attr="n_layer",
        producers=(("attn.c_proj", Producer("attn.c_attn", parts=3, through="heads")),),  # mlp.c_proj reads GELU
    ),
}


def _supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def adapter_for_config(config) -> Adapter:
    """The adapter for ``config.model_type``, adjusted for post-norm variants."""
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise SlimlmError(
            f"model type {model_type!r} has no slimlm adapter; supported: {_supported()} "
            "(add an Adapter to slimlm/models/adapters.py to support it)"
        )
    flag = adapter.pre_norm_flag
    if flag is not None and getattr(text_config(config, adapter), flag, True) is False:
        groups = tuple(LinearGroup(None, g.linears) for g in adapter.groups)
        adapter = dataclasses.replace(adapter, groups=groups)
    return adapter


def get_adapter(model: nn.Module) -> Adapter:
    config = getattr(model, "config", None)
    if config is None:
        raise SlimlmError(
            f"{type(model).__name__} has no .config; pass a Hugging Face transformers model "
            f"(supported model types: {_supported()})"
        )
    return adapter_for_config(config)


def text_config(config, adapter: Adapter | None = None):
    """The config holding the language model's numbers (itself unless multimodal)."""
    adapter = adapter or ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is not None and adapter.text_config:
        return getattr(config, adapter.text_config)
    return config


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    adapter = get_adapter(model)
    blocks = model.get_submodule(adapter.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise SlimlmError(
            f"{adapter.blocks} in {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList; "
            f"the {adapter.family} adapter does not match this model"
        )
    return blocks


def block_linears(block: nn.Module, adapter: Adapter) -> dict[str, nn.Module]:
    """Block-relative name -> linear (nn.Linear or Conv1D), in group order."""
    return {name: block.get_submodule(name) for name in adapter.linear_names()}


def head_layout(config) -> HeadLayout:
    adapter = adapter_for_config(config)
    cfg = text_config(config, adapter)
    n_heads = int(getattr(cfg, adapter.n_heads_attr))
    n_kv = getattr(cfg, adapter.n_kv_heads_attr, None) if adapter.n_kv_heads_attr else None
    head_dim = getattr(cfg, adapter.head_dim_attr, None) if adapter.head_dim_attr else None
    if head_dim is None:
        head_dim = int(getattr(cfg, adapter.hidden_attr)) // n_heads
    return HeadLayout(n_heads=n_heads, n_kv_heads=int(n_kv or n_heads), head_dim=int(head_dim))


def num_layers(config) -> int:
    adapter = adapter_for_config(config)
    return int(getattr(text_config(config, adapter), adapter.n_layers_attr))


def kv_bytes_per_token(config, bytes_per_el: float) -> float:
    """K and V cache bytes per token: 2 x layers x kv heads x head dim x bytes.

    Sliding-window layers are counted as full layers (the bound for long contexts
    shorter than the window).
    """
    layout = head_layout(config)
    return 2 * num_layers(config) * layout.n_kv_heads * layout.head_dim * bytes_per_el


def fast_decoder_families() -> tuple[str, ...]:
    """Model types slimlm's lean decoder runs (``Adapter.fast_decoder``), in table order."""
    return tuple(family for family, adapter in ADAPTERS.items() if adapter.fast_decoder)
