"""The runtime-module table: a new module type with structure of its own round-trips through
a checkpoint by subclassing RuntimeModule and adding one table entry, without touching slimlm.io."""

import inspect
import json

import pytest
import torch
from torch import nn

import slimlm.io
import slimlm.nn
from slimlm.io import MANIFEST, load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import RUNTIME_MODULES, RuntimeModule
from slimlm.targets import replace_module

IDS = torch.arange(3, 35).reshape(1, 32)


class RankedLinear(RuntimeModule):
    """A test-only two-factor linear whose shape depends on ``rank`` (not a base manifest key)."""

    def __init__(self, in_features, out_features, rank, *, bias, dtype):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def empty(cls, in_features, out_features, *, bias, dtype, rank):
        return cls(in_features, out_features, rank, bias=bias, dtype=dtype)

    def manifest_extra(self):
        return {"rank": self.rank}

    def forward(self, x):
        y = x @ self.A.t() @ self.B.t()
        return y if self.bias is None else y + self.bias


def _factorize(model, rank):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.endswith("q_proj"):
            U, S, Vh = torch.linalg.svd(m.weight.detach(), full_matrices=False)
            low = RankedLinear(m.in_features, m.out_features, rank, bias=m.bias is not None, dtype=m.weight.dtype)
            low.A.copy_(Vh[:rank] * S[:rank, None])
            low.B.copy_(U[:, :rank])
            replace_module(model, name, low)
    return model


def test_a_new_module_with_its_own_structure_round_trips(tmp_path, monkeypatch):
    monkeypatch.setitem(RUNTIME_MODULES, "RankedLinear", RankedLinear)
    model = _factorize(tiny_model("llama"), rank=3)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    entry = next(iter(json.loads((out / MANIFEST).read_text())["modules"].values()))
    assert entry == {"type": "RankedLinear", "in_features": 64, "out_features": 64, "bias": False, "rank": 3}
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_an_unregistered_type_is_refused_in_one_line(tmp_path):
    model = _factorize(tiny_model("llama"), rank=3)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / "ckpt")
    with pytest.raises(slimlm.errors.SlimlmError, match="module type 'RankedLinear' that this slimlm does not know"):
        load_compressed(out)


def test_every_runtime_module_class_is_in_the_table():
    classes = {obj for _, obj in inspect.getmembers(slimlm.nn, inspect.isclass)
               if issubclass(obj, RuntimeModule) and obj is not RuntimeModule and hasattr(obj, "empty")}
    abstract = {slimlm.nn.PackedLinear}
    assert classes - abstract == set(RUNTIME_MODULES.values())
    assert all(name == cls.__name__ for name, cls in RUNTIME_MODULES.items())


def test_io_names_no_module_type():
    source = inspect.getsource(slimlm.io)
    assert not any(name in source for name in RUNTIME_MODULES), "slimlm.io must read the table, not name types"
