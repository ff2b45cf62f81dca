import pytest
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_model
from slimlm.targets import Targets, candidate_linears, match_override, replace_module, select_linears


def test_default_targets_are_every_block_linear_but_not_lm_head():
    model = tiny_model("llama")
    chosen = select_linears(model, Targets())
    assert len(chosen) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert "lm_head" not in chosen
    assert "lm_head" in select_linears(model, Targets(lm_head=True))


def test_include_exclude_globs():
    model = tiny_model("llama")
    down = select_linears(model, Targets(include=("*.down_proj",)))
    assert list(down) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    rest = select_linears(model, Targets(exclude=("*.mlp.*",)))
    assert len(rest) == 8 and all(".self_attn." in n for n in rest)
    with pytest.raises(SlimlmError, match="select no linear"):
        select_linears(model, Targets(include=("*.nothing",)))
    with pytest.raises(SlimlmError, match="glob patterns"):
        Targets(include="*.q_proj")


def test_gpt2_conv1d_linears_are_candidates():
    model = tiny_model("gpt2")
    names = list(candidate_linears(model))
    assert "transformer.h.0.attn.c_attn" in names and len(names) == 2 * 4


def test_override_and_replace():
    assert match_override("a.b.down_proj", (("*.up_proj", 1), ("*.down_proj", 2), ("*", 3))) == 2
    assert match_override("x", ()) is None
    model = tiny_model("llama")
    new = nn.Identity()
    replace_module(model, "model.layers.1.mlp.down_proj", new)
    assert model.model.layers[1].mlp.down_proj is new
