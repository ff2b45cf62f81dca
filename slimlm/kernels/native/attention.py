"""Decode attention through the native library: one new token per sequence over a KV cache (``attention.c``).

``decode_attention(q, k, v, scale)`` is ``softmax(scale * q k^T) v`` for
``q (B, Hq, 1, D)`` over ``k, v (B, Hkv, S, D)`` (grouped-query: query head
``i`` reads KV head ``i // (Hq / Hkv)``), float32, no mask. The cache's
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


def fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``decode_attention`` takes these tensors (one query token, float32 on the CPU, rows contiguous)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    return (T == 1 and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and Hq % Hkv == 0 and Hq // Hkv <= MAX_GROUP and k.shape[2] >= 1
            and k.stride(3) == 1 and v.stride(3) == 1 and k.stride(2) == D and v.stride(2) == D)  # fmt: skip


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = native().lib.slimlm_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, Hkv,
                                         Hq // Hkv, S, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
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
