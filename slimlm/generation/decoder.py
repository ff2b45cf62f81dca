"""A lean forward for llama-like decoders over slimlm's KV-cache protocol (see kv/protocol.py).

``FastDecoder`` walks the HF model's own modules (read through the adapter
table): norms and embeddings are called as modules, every linear that is not
a plain float ``nn.Linear`` (QuantLinear, W8A8Linear, sparse or pruned
replacements) is called as a module too, and q/k/v and gate/up linears are
fused into one matmul each when they are all plain float (float32
decode-sized matmuls go through oneDNN, see ``slimlm.kernels.dense``) or all
``QuantLinear`` of one per-row/per-group int scheme and kernel (one quantized
matmul, the weights shared with the model: ``slimlm.nn.fused_quant``).
``fuse=False`` calls every linear on its own. Head counts are read per layer from
the linears' shapes, so structurally pruned models (fewer heads, neurons or
layers) run as they are. The attention goes through a :class:`KVCache`.
One-token steps of a float32 model on the CPU without a mask run the native
decode attention kernel when the native library loads (``slimlm.kernels.native.attention``;
``native_attention=False`` or ``SLIMLM_NATIVE=0``: torch's SDPA).
``kv_dtype`` ("float16", "bfloat16") keeps the cache's keys and values in half
precision (half the cache's memory and the bytes the decode attention reads,
as llama.cpp's default f16 cache does); they are widened to the model's dtype
where attention reads them, so the numbers differ from a float32 cache by the
rounding of the stored keys and values only. Default: the model's dtype.

``HFDecoder`` is the generic path for every other family: the HF forward
with a transformers cache, behind the same ``forward`` signature.
``make_decoder(model)`` picks one.

Signature shared by both::

    logits = decoder(input_ids, positions, cache, n_logits=None)
    # input_ids, positions: (B, T) long; positions < 0 mark left padding
    # logits: (B, T, V), or (B, n_logits, V) for the last n_logits tokens
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.kernels import KernelReport, dense, kernel_layers, report_layers
from slimlm.kernels import native as native_kernels
from slimlm.kernels.native import attention as native_attention
from slimlm.generation.kv.hf import HFCache
from slimlm.generation.kv.protocol import CacheSpec, KVCache, KVView
from slimlm.generation.kv.static import StaticKVCache
from slimlm.generation.rope import Rope, apply_rotary_signed
from slimlm.models.adapters import ADAPTERS, Adapter, decoder_blocks, fast_decoder_families, head_layout, text_config
from slimlm.nn.fused_quant import FusedQuantLinear, fusable

log = logging.getLogger("slimlm.generation")

FAST_FAMILIES = fast_decoder_families()  # the adapters marked fast_decoder


def _plain(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def _linear_fn(m: nn.Module) -> Callable[[Tensor], Tensor]:
    if _plain(m):
        w, b = m.weight, m.bias
        return lambda x: dense.linear(x, w, b)
    return m  # a runtime module: its own kernel


def _cat_fn(mods: list[nn.Module], fuse: bool) -> Callable[[Tensor], Tensor]:
    """x -> the outputs of linears reading x, concatenated on the last dim; one matmul when fusable
    (all plain float, or all QuantLinear of one row-wise int scheme and kernel: ``nn.fused_quant``)."""
    if fuse and all(_plain(m) for m in mods) and len({m.weight.dtype for m in mods}) == 1:
        w = torch.cat([m.weight.detach() for m in mods])  # (sum out, in)
        has_bias = any(m.bias is not None for m in mods)
        b = torch.cat([m.bias.detach() if m.bias is not None else w.new_zeros(m.out_features) for m in mods]) \
            if has_bias else None
        return lambda x: dense.linear(x, w, b)
    if fuse and fusable(mods) is None:  # quantized parts of one int scheme: one quantized matmul
        return FusedQuantLinear(mods)
    fns = [_linear_fn(m) for m in mods]
    return lambda x: torch.cat([f(x) for f in fns], dim=-1)


def _rms_parts(norm: nn.Module, kind: str) -> tuple[Tensor, float] | None:
    """(weight, eps) of an HF RMSNorm (``kind``: the family's ``Adapter.norm_kind``) over the last dim in
    float32, else None (then call the module)."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if kind != "rmsnorm" or not isinstance(w, Tensor) or eps is None:
        return None
    return (w.detach(), float(eps)) if w.dtype == torch.float32 and w.dim() == 1 else None


def _norm_fn(norm: nn.Module, adapter: Adapter) -> Callable[[Tensor], Tensor]:
    """One fused ``rms_norm`` call for float32 RMSNorms (Gemma's x * (1 + w) folded into w), else the module."""
    parts = _rms_parts(norm, adapter.norm_kind)
    if parts is None:
        return norm
    w, eps = parts
    offset = adapter.norm_weight_offset
    w = w + offset if offset else w
    return lambda x: F.rms_norm(x, (w.shape[0],), w, eps)


def _qk_norm_fn(attn: nn.Module, n_q: int, n_kv: int, norm_kind: str) -> Callable[[Tensor], Tensor] | None:
    """Qwen3's per-head RMSNorm of q and k as one call over (B, T, Hq + Hkv, D), or None without q/k norms."""
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if qn is None or kn is None:
        return None
    pq, pk = _rms_parts(qn, norm_kind), _rms_parts(kn, norm_kind)
    if pq is None or pk is None or pq[1] != pk[1]:
        return lambda qk: torch.cat([qn(qk[:, :, :n_q]), kn(qk[:, :, n_q:])], dim=2)
    D = pq[0].shape[0]
    w = torch.cat([pq[0].expand(n_q, D), pk[0].expand(n_kv, D)])  # (Hq + Hkv, D)
    return lambda qk: F.rms_norm(qk, (D,), None, pq[1]) * w


def _act_fn(act: nn.Module) -> Callable[[Tensor], Tensor]:
    return F.silu if isinstance(act, nn.SiLU) else act


def _out_features(m: nn.Module) -> int:
    n = getattr(m, "out_features", None)
    if not isinstance(n, int):
        raise SlimlmError(f"{type(m).__name__} has no integer out_features; the fast decoder needs it "
                          "(use make_decoder(model, fast=False))")
    return n


@dataclass
class _Layer:
    in_norm: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], Tensor]  # (B, T, H) -> (B, T, (Hq + 2 Hkv) * D)
    qk_norm: Callable[[Tensor], Tensor] | None
    o_proj: Callable[[Tensor], Tensor]
    mlp_norm: Callable[[Tensor], Tensor]
    gate_up: Callable[[Tensor], Tensor]  # (B, T, H) -> (B, T, 2 * I)
    act: Callable[[Tensor], Tensor]
    down: Callable[[Tensor], Tensor]
    n_q: int
    n_kv: int
    n_ff: int
    scale: float


def _fast_refusal(model: nn.Module) -> str | None:
    """Why the fast path cannot run this model, or None."""
    cfg = model.config
    adapter = ADAPTERS.get(cfg.model_type)
    if adapter is None or not adapter.fast_decoder:
        return f"model type {cfg.model_type!r} is not one of the fast families ({', '.join(FAST_FAMILIES)})"
    tcfg = text_config(cfg, adapter)
    rope = getattr(tcfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "dynamic":
        return "dynamic rope scaling depends on the sequence length"
    layer_types = getattr(tcfg, "layer_types", None) or ()
    if len(set(layer_types)) > 1:  # one window for all layers is all the static cache knows
        return f"mixed attention layer types {sorted(set(layer_types))}"
    return None


def _group_name(names: list[str]) -> str:
    """['a.b.q_proj', 'a.b.k_proj'] -> 'a.b.q_proj+k_proj (fused)'."""
    prefix = names[0].rpartition(".")[0]
    return f"{prefix}.{'+'.join(n.rpartition('.')[2] for n in names)} (fused)"


class FastDecoder(nn.Module):
    """Lean forward of a llama-like HF model (``FAST_FAMILIES``); see the module docstring."""

    def __init__(self, model: nn.Module, *, fuse: bool = True, native_attention: bool | None = None,
                 kv_dtype: torch.dtype | str | None = None):
        super().__init__()
        why = _fast_refusal(model)
        if why is not None:
            raise SlimlmError(f"the fast decoder cannot run this model: {why}; use make_decoder(model) "
                              "to fall back to the HF forward")
        self.model = model
        adapter = self.adapter = ADAPTERS[model.config.model_type]
        cfg = text_config(model.config, adapter)
        self.head_dim = head_layout(model.config).head_dim
        self.embed = model.get_submodule(adapter.embeddings[0])
        self.final_norm = _norm_fn(model.get_submodule(adapter.final_norm), adapter)
        self.lm_head = _linear_fn(model.get_submodule(adapter.lm_head))
        self._fused: list[tuple[FusedQuantLinear, list[nn.Module]]] = []  # each with the linears it stands for
        self.layers = [self._layer(block, fuse) for block in decoder_blocks(model)]
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.kv_dtype = self.dtype if kv_dtype is None else kv_cache_dtype(kv_dtype)
        self.device = next(model.parameters()).device
        self.sliding_window = self._window(cfg)
        rotary = model.get_submodule(adapter.blocks.rsplit(".", 1)[0] + ".rotary_emb")
        n_pos = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
        self.rope = Rope.from_module(rotary, n_pos, dtype=self.dtype, device=self.device)
        self._rotary = rotary
        # one-token steps of a float32 model on the CPU: the native kernel (3x torch's SDPA at 600 keys, 2 threads)
        cpu32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.native_attention = cpu32 and native_kernels.available() if native_attention is None else native_attention

    def _window(self, cfg) -> int | None:
        types = getattr(cfg, "layer_types", None) or ()
        window = getattr(cfg, "sliding_window", None)
        if self.adapter.sliding_window_all_layers or "sliding_attention" in types:
            return window
        return None

    def _layer(self, block: nn.Module, fuse: bool) -> _Layer:
        attn, mlp = block.self_attn, block.mlp
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        n_q, n_kv = _out_features(q) // self.head_dim, _out_features(k) // self.head_dim
        if n_kv < 1 or n_q % n_kv:
            raise SlimlmError(f"a layer has {n_q} query heads and {n_kv} KV heads; the query heads must be a "
                              "multiple of the KV heads")
        adapter = self.adapter
        qkv, gate_up = _cat_fn([q, k, v], fuse), _cat_fn([mlp.gate_proj, mlp.up_proj], fuse)
        self._fused += [(f, parts) for f, parts in ((qkv, [q, k, v]), (gate_up, [mlp.gate_proj, mlp.up_proj]))
                        if isinstance(f, FusedQuantLinear)]  # fmt: skip
        return _Layer(
            in_norm=_norm_fn(block.input_layernorm, adapter),
            qkv=qkv,
            qk_norm=_qk_norm_fn(attn, n_q, n_kv, adapter.norm_kind),
            o_proj=_linear_fn(attn.o_proj),
            mlp_norm=_norm_fn(block.post_attention_layernorm, adapter),
            gate_up=gate_up,
            act=_act_fn(mlp.act_fn),
            down=_linear_fn(mlp.down_proj),
            n_q=n_q,
            n_kv=n_kv,
            n_ff=_out_features(mlp.gate_proj),
            scale=float(getattr(attn, "scaling", self.head_dim**-0.5)),
        )

    def kernel_report(self, *, probe: bool = True) -> KernelReport:
        """Which kernel each quantized matmul of a decode step runs: a fused group is one entry, named
        ``...self_attn.q_proj+k_proj+v_proj (fused)``; the model's other runtime linears as in
        :func:`slimlm.kernels.kernel_report`."""
        names = {id(m): name for name, m in self.model.named_modules()}
        in_fused = {id(p) for _, parts in self._fused for p in parts}
        fused = [(_group_name([names[id(p)] for p in parts]), f) for f, parts in self._fused]
        rest = [(n, m) for n, m in kernel_layers(self.model) if id(m) not in in_fused]
        return report_layers(fused + rest, probe=probe)

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(kv_heads=tuple(layer.n_kv for layer in self.layers), head_dim=self.head_dim,
                         dtype=self.kv_dtype, device=self.device, sliding_window=self.sliding_window)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        self.ensure_positions(max_len)
        return StaticKVCache(self.cache_spec(), batch=batch, max_len=max_len)

    def ensure_positions(self, n: int) -> None:
        """Grow the rotary table to cover positions 0..n-1."""
        if n > self.rope.max_positions:
            self.rope = Rope.from_module(self._rotary, n, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, positions: Tensor, cache: KVCache, *, n_logits: int | None = None) -> Tensor:
        x = self.embed(input_ids)  # (B, T, H)
        cos, sin = self.rope.cos_sin_signed(positions)  # (B, 1, T, D) each
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, layer.in_norm(x), cache, positions, cos, sin)
            gu = layer.gate_up(layer.mlp_norm(x))  # (B, T, 2 * I)
            x = x + layer.down(layer.act(gu[..., :layer.n_ff]) * gu[..., layer.n_ff:])
        if n_logits is not None:
            x = x[:, -n_logits:]
        return self.lm_head(self.final_norm(x))

    def _attention(self, i: int, layer: _Layer, h: Tensor, cache: KVCache, positions: Tensor,
                   cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = h.shape
        D, Hq, Hkv = self.head_dim, layer.n_q, layer.n_kv
        qkv = layer.qkv(h).view(B, T, Hq + 2 * Hkv, D)
        qk = qkv[:, :, : Hq + Hkv]  # (B, T, Hq + Hkv, D): queries and keys rotate together
        if layer.qk_norm is not None:  # qwen3: RMSNorm over each head before rotary
            qk = layer.qk_norm(qk)
        qk = qk.transpose(1, 2)  # (B, Hq + Hkv, T, D)
        v = qkv[:, :, Hq + Hkv:].transpose(1, 2).to(self.kv_dtype)  # (B, Hkv, T, D), as the cache keeps it
        if cache.raw_keys:
            q, k = qk.split([Hq, Hkv], dim=1)
            view = cache.update(i, k.to(self.kv_dtype), v, positions=positions, rope=self.rope)
            q = self.rope(q, view.q_positions)
        else:
            q, k = apply_rotary_signed(qk, cos, sin).split([Hq, Hkv], dim=1)
            view = cache.update(i, k.to(self.kv_dtype), v, positions=positions, rope=self.rope)
        out = attend(q, view, scale=layer.scale, observe=cache.observe if cache.wants_scores(i) else None, layer=i,
                     native=self.native_attention)  # fmt: skip
        return layer.o_proj(out.transpose(1, 2).reshape(B, T, Hq * D))  # (B, T, Hq*D) -> (B, T, H)


def attend(q: Tensor, view: KVView, *, scale: float, observe=None, layer: int = 0, native: bool = False) -> Tensor:
    """Attention of q (B, Hq, T, D) over a cache view; GQA by folding query groups into rows.

    With ``observe`` the probabilities are computed explicitly and handed to
    ``observe(layer, probs)`` as (B, Hq, T, S) float32. ``native``: one-token
    steps without a mask run the native decode kernel (``kernels.native.attention``).
    """
    if native and observe is None and view.mask is None and native_attention.fits(q, view.k, view.v):
        return native_attention.decode_attention(q, view.k, view.v, scale)
    B, Hq, T, D = q.shape
    Hkv, S = view.k.shape[1], view.k.shape[2]
    g = Hq // Hkv
    qf = q.reshape(B, Hkv, g * T, D)  # (B, Hkv, g*T, D): the g query heads of a KV head stacked
    mask = view.mask
    if mask is not None and g > 1:
        mask = mask.expand(B, 1, T, S).repeat(1, 1, g, 1)  # (B, 1, g*T, S) in the same (g, T) order
    if observe is None:
        k, v = view.k.to(q.dtype), view.v.to(q.dtype)  # a cache kept in another precision (kv_dtype)
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)
    else:
        scores = (qf.float() @ view.k.float().transpose(-1, -2)) * scale  # (B, Hkv, g*T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        observe(layer, probs.view(B, Hq, T, S))
        out = (probs @ view.v.float()).to(q.dtype)
    return out.reshape(B, Hq, T, D)  # CUDA's SDPA kernels may hand back another memory layout (not viewable)


class HFDecoder(nn.Module):
    """The generic path: the HF model's forward with a transformers cache, same signature as FastDecoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def new_cache(self, batch: int, max_len: int) -> HFCache:
        return HFCache(self.model, batch=batch, max_len=max_len)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, positions: Tensor, cache: HFCache, *, n_logits: int | None = None) -> Tensor:
        if not isinstance(cache, HFCache):
            raise SlimlmError(f"the HF forward needs an HFCache (decoder.new_cache), got {type(cache).__name__}; "
                              "custom KV caches need a fast-path family: " + ", ".join(FAST_FAMILIES))
        if cache.length + input_ids.shape[1] > cache.max_len:
            raise SlimlmError(f"KV cache full: {cache.length + input_ids.shape[1]} slots needed, max_len is "
                              f"{cache.max_len}; build the cache with a larger max_len")
        cache.mask2d = torch.cat([cache.mask2d, (positions >= 0).long()], dim=1)  # (B, S)
        out = self.model(input_ids=input_ids, attention_mask=cache.mask2d, position_ids=positions.clamp_min(0),
                         cache=cache.hf, use_cache=True, logits_to_keep=n_logits or 0)
        return out.logits


KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_cache_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``kv_dtype`` as a torch dtype: one of ``KV_DTYPES`` (names or dtypes)."""
    found = KV_DTYPES.get(dtype) if isinstance(dtype, str) else dtype if dtype in KV_DTYPES.values() else None
    if found is None:
        raise SlimlmError(f"kv_dtype {dtype!r} is not one of {', '.join(KV_DTYPES)}")
    return found


def make_decoder(model: nn.Module, *, fast: bool | None = None, fuse: bool = True,
                 kv_dtype: torch.dtype | str | None = None) -> nn.Module:
    """FastDecoder when the family allows it (``fast=None``: automatic), else HFDecoder. ``kv_dtype``: what
    the fast decoder's KV cache stores keys and values in (default: the model's dtype); the HF forward keeps
    its own cache and refuses it."""
    if fast is False:
        why = "fast=False"
    else:
        why = _fast_refusal(model)
        if why is None:
            return FastDecoder(model, fuse=fuse, kv_dtype=kv_dtype)
        if fast:
            raise SlimlmError(f"the fast decoder cannot run this model: {why}")
        log.info("generic decode path (HF forward): %s", why)
    if kv_dtype is not None:
        raise SlimlmError(f"kv_dtype needs slimlm's fast decoder, which does not run here ({why}); drop kv_dtype")
    return HFDecoder(model)
