"""SharedQuantEmbedding: a tied model's input embedding that reads the quantized output projection's table.

A tied model (SmolLM2: one float ``(V, d)`` table for the lookup and the
last matmul) whose head is quantized normally gets untied (:mod:`slimlm.nn.tied`):
the embedding stays float and the head is stored a second time. llama.cpp
keeps one quantized table instead (``token_embd``), dequantizing the rows a
prompt looks up. This module does that: it holds no tensor of its own and,
per forward, asks the head (a :class:`~slimlm.nn.packed.PackedLinear`) for
the rows ``ids`` of its weight (``dequantized_rows``: those rows' codes,
scales and zeros alone, :mod:`slimlm.formats.rows`), so

    embedding(ids) == head.dequantized_weight()[ids].to(dtype)     bit for bit

and the model holds the table once, in the head's packed form. The head is
referenced, not registered as a submodule, so ``state_dict()`` and the size
accounting see it once, where it is. The manifest entry names the head it
reads (``reads``); loading builds an empty shell and :meth:`link` finds the
head once every shell is in place.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.errors import SlimlmError
from slimlm.formats.rows import rows_refusal
from slimlm.formats.scheme import Scheme
from slimlm.nn.packed import PackedLinear
from slimlm.nn.runtime import RuntimeModule, replace_module
from slimlm.nn.tied import shared_embedding

log = logging.getLogger("slimlm.nn")


class SharedQuantEmbedding(RuntimeModule):
    """``embedding(ids) (..., ) -> (..., d)``: rows of the quantized head at ``reads``, in the model's dtype.

    In manifest terms a lookup is a linear from one-hot ids: ``in_features`` is
    the vocabulary ``V``, ``out_features`` the width ``d`` (the head's transpose).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, *, reads: str,
                 dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        why = rows_refusal(scheme)
        if why is not None:
            raise SlimlmError(f"the embedding cannot read a {scheme!r} table row by row: {why}")
        self.in_features, self.out_features = num_embeddings, embedding_dim
        self.bias = None
        self.scheme = scheme
        self.reads = reads
        self.compute_dtype = dtype
        self.__dict__["_head"] = None  # a reference, not a submodule: stored and counted once, as the head

    @classmethod
    def empty(cls, in_features: int, out_features: int, scheme: Scheme, *, bias: bool, reads: str,
              dtype: torch.dtype = torch.float32) -> SharedQuantEmbedding:  # fmt: skip
        """A shell for a checkpoint; :meth:`link` attaches the head once it is in place."""
        if bias or not isinstance(reads, str):
            raise SlimlmError(f"a shared embedding has no bias and reads a module by name, got bias={bias!r}, "
                              f"reads={reads!r}")  # fmt: skip
        return cls(in_features, out_features, scheme, reads=reads, dtype=dtype)

    @classmethod
    def reading(cls, head: nn.Module, *, reads: str, dtype: torch.dtype) -> SharedQuantEmbedding:
        """The embedding that looks its rows up in ``head`` (the quantized output projection at ``reads``)."""
        if not isinstance(head, PackedLinear):
            raise SlimlmError(f"{reads} is a {type(head).__name__}; the embedding can share only a weight-only "
                              "quantized head (rtn, gptq or awq with lm_head set)")  # fmt: skip
        module = cls(head.out_features, head.in_features, head.scheme, reads=reads, dtype=dtype)
        module._attach(head)
        return module

    def manifest_extra(self) -> dict[str, Any]:
        return {"reads": self.reads}

    def link(self, model: nn.Module) -> None:
        try:
            head = model.get_submodule(self.reads)
        except AttributeError:
            raise SlimlmError(f"the shared embedding reads {self.reads!r}, which the model does not have; the "
                              "checkpoint is damaged: compress again") from None  # fmt: skip
        self._attach(head)

    def _attach(self, head: nn.Module) -> None:
        if not isinstance(head, PackedLinear) or head.scheme != self.scheme or \
                head.shape != (self.in_features, self.out_features):  # fmt: skip
            raise SlimlmError(f"the shared embedding ({self.in_features} x {self.out_features}, {self.scheme!r}) "
                              f"does not match {self.reads} ({type(head).__name__} {getattr(head, 'shape', '?')}, "
                              f"{getattr(head, 'scheme', None)!r}); the checkpoint is damaged: compress again")
        self.__dict__["_head"] = head

    @property
    def head(self) -> PackedLinear:
        head = self.__dict__["_head"]
        if head is None:
            raise SlimlmError(f"the shared embedding is not linked to {self.reads}: call link(model)")
        return head

    @property
    def num_embeddings(self) -> int:
        return self.in_features

    @property
    def embedding_dim(self) -> int:
        return self.out_features

    @property
    def weight(self) -> Tensor:
        """The whole table ``(V, d)`` in the model's dtype, dequantized on each access (what a float
        embedding's ``weight`` would hold; for its dtype, device or a one-off read, not per token)."""
        return self.head.dequantized_weight().to(self.compute_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        head = self.head
        flat = ids.reshape(-1).to(device=head.weight_device, dtype=torch.long)  # (n,)
        rows = head.dequantized_rows(flat)  # (n, d) float32
        return rows.to(self.compute_dtype).reshape(*ids.shape, self.out_features)  # (..., d)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 -- torch's signature
        super()._apply(fn, recurse)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # follows model.to(dtype)
        return self

    def dequantized_table(self) -> nn.Embedding:
        """A float ``nn.Embedding`` holding the table this module reads (for a float export)."""
        emb = nn.Embedding(self.in_features, self.out_features, dtype=self.compute_dtype)
        emb.weight.data = self.weight.detach().clone()
        return emb.to(self.head.weight_device)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, reads={self.reads}, "
                f"scheme={self.scheme!r}")  # fmt: skip


# --- the model-level swap ------------------------------------------------------------------------


def tied_input_embedding(model: nn.Module, head_name: str, scheme: Scheme) -> nn.Embedding:
    """The float embedding that the head at ``head_name`` shares, refused in one line (before anything
    changes) when the head is not tied to a plain ``nn.Embedding`` or ``scheme`` cannot be read by rows."""
    emb = shared_embedding(model, model.get_submodule(head_name), nn.Module())
    if emb is None:
        raise SlimlmError(f"embedding: shared needs {head_name} tied to the input embedding (tie_word_embeddings); "
                          "this model's are separate tables (or an earlier step untied them): drop embedding: "
                          "shared")  # fmt: skip
    if type(emb) is not nn.Embedding:
        raise SlimlmError(f"embedding: shared replaces a plain nn.Embedding; this model's is a "
                          f"{type(emb).__name__} (its lookup does more than read rows): drop embedding: shared")
    why = rows_refusal(scheme)
    if why is not None:
        raise SlimlmError(f"embedding: shared reads {head_name}'s table row by row, which {scheme!r} cannot: {why}")
    return emb


def share_embedding(model: nn.Module, head_name: str, emb: nn.Embedding) -> str:
    """Swap ``emb`` (the float table the head at ``head_name`` was tied to) for a :class:`SharedQuantEmbedding`
    reading the quantized head. -> the embedding's full name."""
    name = next(n for n, m in model.named_modules() if m is emb)
    new = SharedQuantEmbedding.reading(model.get_submodule(head_name), reads=head_name, dtype=emb.weight.dtype)
    replace_module(model, name, new)
    W = emb.weight  # (V, d)
    log.info("%s now reads %s's quantized table (one storage): -%.1f MB on disk and in memory",
             name, head_name, W.numel() * W.element_size() / 1e6)  # fmt: skip
    return name


def float_embeddings(model: nn.Module) -> list[str]:
    """Replace every :class:`SharedQuantEmbedding` by a float ``nn.Embedding`` of the table it reads (for a
    float export; in place). -> their full names."""
    shared = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedQuantEmbedding)]
    for name, m in shared:
        replace_module(model, name, m.dequantized_table())
    return [n for n, _ in shared]
