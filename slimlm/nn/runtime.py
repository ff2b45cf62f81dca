"""What every runtime module a checkpoint can hold shares: how it describes itself in the manifest.

A compressed checkpoint stores tensors in safetensors and, per swapped-in
module, one manifest entry (``slimlm_manifest.json``). Loading builds an
empty shell from that entry and lets ``load_state_dict`` fill it, so the
entry must say everything the shell's *structure* depends on. The base entry
is the type name, the two feature sizes, whether there is a bias, and the
number format when the module has one; a module whose structure needs more
(a low-rank linear's rank, an adapter's config) adds its own keys in
:meth:`RuntimeModule.manifest_extra` and reads them back in
:meth:`RuntimeModule.from_manifest`. A runtime module nested in another (a
quantized base under a side path) has no entry of its own: the outer one
carries it in ``manifest_extra`` and builds it back from the table the loader
passes. ``slimlm.io`` never names a module type.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme, scheme_to_dict
from slimlm.nn.tied import shared_embedding, untie_head
from slimlm.validate import check_bool, check_pos_int

_BASE_KEYS = ("type", "in_features", "out_features", "bias", "scheme")


class RuntimeModule(nn.Module):
    """Base of the modules that replace ``nn.Linear`` in a compressed model (not used directly).

    Subclasses set ``in_features``, ``out_features`` and ``bias`` (a parameter or None), may set
    ``scheme``, and provide ``empty(in_features, out_features, [scheme], *, bias, dtype)``.
    """

    in_features: int
    out_features: int
    # True when every parameter is a plain float tensor a training run may update in place (a low-rank
    # linear's factors); False for codes, scales and masks, which training keeps fixed.
    trainable_floats: bool = False

    def manifest_extra(self) -> dict[str, Any]:
        """Structure beyond the base entry that ``empty`` needs (JSON values)."""
        return {}

    def manifest_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }
        if getattr(self, "scheme", None) is not None:
            entry["scheme"] = scheme_to_dict(self.scheme)
        clash = set(self.manifest_extra()) & set(_BASE_KEYS)
        if clash:
            raise SlimlmError(f"{type(self).__name__}.manifest_extra may not redefine {sorted(clash)}")
        return {**entry, **self.manifest_extra()}

    def link(self, model: nn.Module) -> None:
        """Find the modules of ``model`` this one reads (a shared embedding's head), once a checkpoint's
        shells are all in place; most modules read none."""

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], *, dtype: torch.dtype,
                      table: Mapping[str, type[RuntimeModule]] | None = None) -> RuntimeModule:  # fmt: skip
        """An empty shell of the structure ``entry`` describes; ``load_state_dict`` fills it.

        ``table`` is the runtime-module table (``slimlm.nn.RUNTIME_MODULES``), for a module that holds
        another runtime module and builds its shell from an entry of its own (``CompensatedLinear``).
        """
        check_pos_int("in_features", entry.get("in_features"), "the layer's input size")
        check_pos_int("out_features", entry.get("out_features"), "the layer's output size")
        check_bool("bias", entry.get("bias"))
        extra = {k: v for k, v in entry.items() if k not in _BASE_KEYS}
        args = (entry["in_features"], entry["out_features"])
        if "scheme" in entry:
            args += (parse_scheme(entry["scheme"]),)
        try:
            return cls.empty(*args, bias=entry["bias"], dtype=dtype, **extra)
        except TypeError as e:  # a scheme missing or given where none belongs, a key this type does not take
            raise SlimlmError(f"{cls.__name__} cannot be built from keys {sorted(entry)} ({e})") from None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at full name ``name`` (``model.layers.3.mlp.down_proj``) for ``new``.

    Swapping an output projection tied to the input embedding unties them (:mod:`slimlm.nn.tied`)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    emb = shared_embedding(model, getattr(parent, child, None), new)
    setattr(parent, child, new)
    if emb is not None:
        untie_head(model, name, emb, new)
