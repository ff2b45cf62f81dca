"""Decode attention through the native library: one new token per sequence over a KV cache (``attention.c``).

``decode_attention(q, k, v, scale)`` is ``softmax(scale * q k^T) v`` for
``q (B, Hq, 1, D)`` over ``k, v (B, Hkv, S, D)`` (grouped-query: query head
``i`` reads KV head ``i // (Hq / Hkv)``), no mask; ``q`` and the output are
float32, ``k`` and ``v`` float32, float16 or bfloat16 (a half-precision KV
cache: read at half the bytes, widened to float32 in registers). The cache's
views are read in place (rows of D contiguous floats; batch and head
strides free), so a static cache's ``[:, :, :length]`` slice costs no copy.
Inside a compiled graph it is the opaque op ``slimlm::native_attn_decode``.

:func:`fits` says whether a call can take this path; the fast decoder
checks it per step and otherwise runs torch's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.kernels.native.build import native

MAX_GROUP = 16  # query heads per KV head the kernel takes (attention.c's GMAX)
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # attention.c's kv_type codes


def fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``decode_attention`` takes these tensors (one float32 query token on the CPU, K/V of one of
    ``KV_TYPES``, rows contiguous)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    return (T == 1 and q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == v.dtype in KV_TYPES
            and Hq % Hkv == 0 and Hq // Hkv <= MAX_GROUP and k.shape[2] >= 1
            and k.stride(3) == 1 and v.stride(3) == 1 and k.stride(2) == D and v.stride(2) == D)  # fmt: skip


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = native().lib.slimlm_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), KV_TYPES[k.dtype], out.data_ptr(),
                                         B, Hkv, Hq // Hkv, S, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                         scale, torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native decode attention refused (B={B}, Hq={Hq}, Hkv={Hkv}, S={S}, D={D})")
    return out


@torch.library.custom_op("slimlm::native_attn_decode", mutates_args=())
def attn_decode_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return _attend(q, k, v, scale)


@attn_decode_op.register_fake
def _attn_decode_fake(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``(B, Hq, 1, D)`` attention output; the caller has checked :func:`fits` and that the library loaded."""
    if torch.compiler.is_compiling():
        return torch.ops.slimlm.native_attn_decode(q, k, v, scale)
    return _attend(q, k, v, scale)
