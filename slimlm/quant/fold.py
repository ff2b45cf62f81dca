"""Folding a per-channel scale into the op that produces a linear's input (AWQ, SmoothQuant).

Both methods multiply input channel ``j`` of the linears that read one input
by ``s_j`` and divide the producing op's output channel ``j`` by ``s_j``, so
the float model computes the same function:

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T

The producer is either

* the norm before the group, ``y = x_hat * (offset + w) + b`` (offset 1 for
  Gemma's ``(1 + w)``): ``w' = (offset + w) / s - offset``, ``b' = b / s``; or
* a linear whose output channel ``j`` *is* input channel ``j`` of the
  consumer (``up_proj`` before the elementwise gate product, ``fc1`` before a
  ReLU, ``v_proj`` before attention, which mixes tokens but not channels):
  its row ``j`` and bias ``j`` are divided by ``s_j``. A fused producer
  (``qkv_proj``) stacks several outputs; the consumer reads the last slice.

Which op produces which input is data: ``Adapter.producers`` in
:mod:`slimlm.models.adapters`. Tensor maths is computed in float32 and
stored back in the parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.models.adapters import Adapter, Producer
from slimlm.nn import linear_weight


@torch.no_grad()
def fold_into_norm(weight: Tensor, bias: Tensor | None, s: Tensor, *,
                   offset: float = 0.0) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Norm parameters whose output is the old output divided by ``s`` (float32)."""
    w = (offset + weight.float()) / s - offset
    return w, (None if bias is None else bias.float() / s)


@torch.no_grad()
def scale_columns(W: Tensor, s: Tensor) -> Tensor:
    """``W diag(s)``: ``W (out, in)`` with column j times ``s_j`` (float32)."""
    return W.float() * s  # (out, in) * (in,)


@torch.no_grad()
def scale_rows(W: Tensor, bias: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor | None]:
    """``diag(s)^-1 W``, ``b / s``: the producing linear's outputs divided by ``s`` (float32)."""
    return W.float() / s[:, None], (None if bias is None else bias.float() / s)


# --- in place, on modules (nn.Linear or GPT-2's Conv1D through linear_weight's (out, in) view) ---


@torch.no_grad()
def fold_norm(norm: nn.Module, s: Tensor, *, offset: float) -> None:
    """Divide ``norm``'s output by ``s`` (weight and, for LayerNorm, bias)."""
    bias = getattr(norm, "bias", None)
    w, b = fold_into_norm(norm.weight, bias, s, offset=offset)
    norm.weight.copy_(w.to(norm.weight.dtype))
    if bias is not None:
        bias.copy_(b.to(bias.dtype))


@torch.no_grad()
def scale_inputs(linear: nn.Module, s: Tensor) -> None:
    """``W <- W diag(s)``: multiply input column j of ``linear`` by ``s[j]``."""
    W, _ = linear_weight(linear)  # (out, in) view of the parameter
    W.copy_(scale_columns(W, s).to(W.dtype))


@torch.no_grad()
def divide_outputs(linear: nn.Module, s: Tensor) -> None:
    """Divide the last ``len(s)`` outputs of ``linear`` (weight rows and bias) by ``s``."""
    W, bias = linear_weight(linear)  # (out, in) view of the parameter
    rows = W[-s.shape[0] :]  # (k, in): a fused producer's last slice
    new_rows, new_bias = scale_rows(rows, None if bias is None else bias[-s.shape[0] :], s)
    rows.copy_(new_rows.to(rows.dtype))
    if bias is not None:
        bias.data[-s.shape[0] :] = new_bias.to(bias.dtype)


def producing_linear(block: nn.Module, adapter: Adapter, consumer: str) -> tuple[nn.Module, Producer] | None:
    """The linear whose output rows can absorb ``1/s`` for the block-relative ``consumer``, and its
    :class:`Producer` entry; None where none is listed or the activation in between is not a ReLU."""
    producer = adapter.producer(consumer)
    if producer is None:
        return None
    if producer.relu is not None and not isinstance(block.get_submodule(producer.relu), nn.ReLU):
        return None  # e.g. OPT with GELU: a positive scale does not pass through it
    return block.get_submodule(producer.linear), producer
