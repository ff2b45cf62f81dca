import pytest

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerChannel, PerGroup
from slimlm.quant import RTN
from slimlm.methods import METHOD_OF
from slimlm.recipe import load_recipe, recipe_from_dict, shipped_recipes
from slimlm.targets import Targets


def test_shipped_recipes_parse_into_typed_configs():
    names = shipped_recipes()
    assert "default" in names and "rtn-int4-g64" in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.steps and all(type(s) in METHOD_OF for s in recipe.steps)
    default = load_recipe("default").steps[0]
    assert default.scheme == IntScheme(bits=8, symmetric=True, granularity=PerChannel())


def test_step_fields_targets_and_overrides():
    r = recipe_from_dict({"name": "x", "steps": [{
        "method": "rtn", "scheme": {"format": "int", "bits": 3, "group_size": 32},
        "exclude": "*.down_proj", "lm_head": True, "overrides": {"*.v_proj": "int8-channel-sym"}}]})
    step = r.steps[0]
    assert step.scheme == IntScheme(bits=3, granularity=PerGroup(32))
    assert step.targets == Targets(exclude=("*.down_proj",), lm_head=True)
    assert step.scheme_for("model.layers.0.self_attn.v_proj").bits == 8
    assert step.scheme_for("model.layers.0.self_attn.q_proj").bits == 3
    assert r.spec["name"] == "x"


@pytest.mark.parametrize("spec, message", [
    ({"steps": []}, "non-empty 'steps'"),
    ({"steps": [{"scheme": "int4-g64"}]}, "unknown method 'scheme'; valid: rtn"),
    ({"steps": ["rtn"]}, "needs a 'method'"),
    ({"steps": [{"method": "magic"}]}, "unknown method 'magic'; valid: rtn"),
    ({"steps": [{"method": "rtn", "colour": 4}]}, "unknown key"),
    ({"steps": [{"method": "rtn", "scheme": "int4"}]}, "unknown quantization scheme"),
    ({"steps": [{"method": "rtn", "overrides": ["*.x"]}]}, "overrides must be a mapping"),
])
def test_bad_recipes_are_refused_with_the_fix(spec, message):
    with pytest.raises(SlimlmError, match=message):
        recipe_from_dict(spec)


def test_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed")
    with pytest.raises(SlimlmError, match="not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(SlimlmError, match="no recipe 'nope'"):
        load_recipe("nope")
    good = tmp_path / "mine.yaml"
    good.write_text("steps:\n  - method: rtn\n    scheme: nf4\n")
    assert load_recipe(str(good)).name == "mine"


def test_inline_step_form_from_the_issue():
    r = recipe_from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 64, "symmetric": False}}]})
    assert r.steps[0].scheme == IntScheme(bits=4, granularity=PerGroup(64))
    r = recipe_from_dict({"steps": [{"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True}]})
    assert r.steps[0].scheme == IntScheme(bits=8, symmetric=True, granularity=PerChannel())
    with pytest.raises(SlimlmError, match="not both"):
        recipe_from_dict({"steps": [{"method": "rtn", "bits": 8, "scheme": "int8-channel"}]})
    with pytest.raises(SlimlmError, match="must map to its fields"):
        recipe_from_dict({"steps": [{"rtn": 4}]})
