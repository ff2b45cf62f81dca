"""CompensatedLinear: a compressed linear plus a float low-rank side path, ``y = base(x) + B (A x)``.

The side path holds a rank-``r`` approximation ``B @ A`` of the base's error
``W - dequant(Q(W))`` (EoRA, LQER; the factors come from
:mod:`slimlm.lowrank.compensate`). ``A`` is ``(r, in)``, ``B`` is ``(out, r)``,
float parameters in their own dtype (float16 by default, computed in the
input's dtype); the base is any runtime module
with a ``dequantized_weight`` (``QuantLinear`` from GPTQ/AWQ/RTN, the sparse
ones) and stays a submodule, so its kernels, device moves and packed
``state_dict`` form are its own.

Checkpoints: only the outermost runtime module gets a manifest entry
(:func:`slimlm.models.checkpoint.compressed_modules`); this one carries its
base's entry and its rank in :meth:`manifest_extra`, and builds the base's
shell from the same runtime-module table the loader hands to
:meth:`from_manifest`.

Size: :meth:`weight_storage` is the layer's whole storage (base bytes plus
the side path's), which is what bits per weight must count; the model-wide
totals (:mod:`slimlm.models.size`) count the base at the base and the
factors as parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.nn.runtime import RuntimeModule
from slimlm.validate import check_pos_int

log = logging.getLogger("slimlm.nn")

SIDE_DTYPES = ("float16", "bfloat16", "float32")  # what the factors may be stored in


class CompensatedLinear(RuntimeModule):
    """``y = base(x) + (x @ A^T) @ B^T`` (the bias, if any, is the base's)."""

    def __init__(self, base: RuntimeModule, A: Tensor, B: Tensor) -> None:
        super().__init__()
        if isinstance(base, CompensatedLinear) or not hasattr(base, "dequantized_weight"):
            raise SlimlmError(f"a compensated base must be a compressed linear with a dequantized weight, got "
                              f"{type(base).__name__}")  # fmt: skip
        rank = A.shape[0]
        if A.shape != (rank, base.in_features) or B.shape != (base.out_features, rank):
            raise SlimlmError(f"side path A {tuple(A.shape)}, B {tuple(B.shape)} does not fit a "
                              f"{base.in_features} -> {base.out_features} layer")  # fmt: skip
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.base = base
        self.A = nn.Parameter(A.detach().clone(), requires_grad=False)  # (r, in)
        self.B = nn.Parameter(B.detach().clone(), requires_grad=False)  # (out, r)

    @property
    def bias(self) -> Tensor | None:  # the base's; read by the manifest entry and the HF export
        return self.base.bias

    # --- checkpoint ------------------------------------------------------------------------

    def manifest_extra(self) -> dict[str, Any]:
        side_dtype = str(self.A.dtype).removeprefix("torch.")
        return {"rank": self.rank, "side_dtype": side_dtype, "base": self.base.manifest_entry()}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], *, dtype: torch.dtype,
                      table: Mapping[str, type[RuntimeModule]] | None = None) -> RuntimeModule:  # fmt: skip
        """The shell of the base (its own manifest entry, built from ``table``) with zero factors."""
        base_entry = entry.get("base")
        if not isinstance(base_entry, dict) or table is None:
            raise SlimlmError(f"{cls.__name__} needs its base's manifest entry and the runtime-module table")
        base_cls = table.get(base_entry.get("type"))
        if base_cls is None or base_cls is cls:
            raise SlimlmError(f"{cls.__name__}'s base has unknown type {base_entry.get('type')!r}; "
                              f"known: {', '.join(n for n in table if table[n] is not cls)}")  # fmt: skip
        base = base_cls.from_manifest(base_entry, dtype=dtype, table=table)
        return super().from_manifest({**entry, "base": base}, dtype=dtype)

    @classmethod
    def empty(cls, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, rank: int,
              base: RuntimeModule, side_dtype: str = "float32") -> CompensatedLinear:  # fmt: skip
        """Zero factors of ``rank`` in ``side_dtype`` beside the shell ``base``; ``load_state_dict`` fills both.

        The factors keep their own dtype (``load_state_dict`` would silently cast float16 factors into
        float32 ones, and the size accounting would then count twice their bytes)."""
        check_pos_int("rank", rank, "the side path's rank")
        if side_dtype not in SIDE_DTYPES:
            raise SlimlmError(f"side_dtype must be one of {', '.join(SIDE_DTYPES)}, got {side_dtype!r}")
        side = getattr(torch, side_dtype)
        if (base.in_features, base.out_features, base.bias is not None) != (in_features, out_features, bias):
            raise SlimlmError(f"the base entry ({base.in_features} -> {base.out_features}, bias "
                              f"{base.bias is not None}) contradicts the outer one ({in_features} -> "
                              f"{out_features}, bias {bias})")  # fmt: skip
        if rank > min(in_features, out_features):
            raise SlimlmError(f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)}")
        A = torch.zeros(rank, in_features, dtype=side)
        B = torch.zeros(out_features, rank, dtype=side)
        return cls(base, A, B)

    # --- compute and accounting ------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        side = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))  # (..., r) -> (..., out)
        return self.base(x) + side

    def side_weight(self) -> Tensor:
        """``B @ A`` ``(out, in)`` in float32: the compensation the side path adds to the weight."""
        return self.B.float() @ self.A.float()

    def dequantized_weight(self) -> Tensor:
        """The float32 weight ``(out, in)`` the layer computes with: the base's plus ``B @ A``."""
        log.info("merging the rank-%d side path into the dequantized weight (%d x %d)", self.rank,
                 self.out_features, self.in_features)  # fmt: skip
        W = self.base.dequantized_weight().float()  # (out, in)
        return W + self.side_weight().to(W.device)

    def side_storage(self) -> tuple[int, int]:
        """``(parameters, bytes)`` of the side path: ``r * (in + out)`` floats."""
        n = self.A.numel() + self.B.numel()
        return n, self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def weight_storage(self) -> tuple[int, int]:
        """``(number of weights, bytes)`` of the layer: the base's stored form plus the side path
        (the weights are the layer's ``in * out``, so bits per weight include the side path's)."""
        n, base_bytes = self.base.weight_storage()
        return n, base_bytes + self.side_storage()[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
