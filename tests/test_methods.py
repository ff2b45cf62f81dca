"""The method registry (slimlm.methods): one entry per method, read by apply, recipes, the lazy
pipeline and the CLI. The worked example of the docs: a new method is a config, a handler and
one registry entry, and every entry point then knows it."""

from dataclasses import dataclass, field, fields

import pytest
import torch
from torch import nn

from slimlm.api import apply, apply_all, needs_calibration
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.methods import METHOD_OF, METHODS, Method, method_for, method_named
from slimlm.models.tiny import tiny_model
from slimlm.pipelines.lazy import check_lazy
from slimlm.quant.llm_int8 import LLMInt8
from slimlm.recipe import recipe_from_dict
from slimlm.targets import Targets, select_linears

CALIB = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))


def test_names_and_config_types_are_unique_and_consistent():
    assert len(METHODS) == len(METHOD_OF)
    for name, m in METHODS.items():
        assert m.name == name and METHOD_OF[m.config] is m
        assert "targets" in {f.name for f in fields(m.config)}, f"{name}: recipes give every method targets"
        assert m.summary and (m.lazy is not None or m.lazy_check is None)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_parses_from_a_recipe_with_its_defaults(name):
    recipe = recipe_from_dict({"steps": [{"method": name}]})
    assert type(recipe.steps[0]) is METHODS[name].config
    assert method_for(recipe.steps[0]) is METHODS[name]


def test_calibration_is_read_from_the_registry():
    assert not needs_calibration([METHODS["rtn"].config()])
    assert needs_calibration([METHODS["rtn"].config(), METHODS["gptq"].config()])
    assert needs_calibration([LLMInt8()]) and not needs_calibration([LLMInt8(calibrated=False)])


def test_unknown_config_and_name_are_refused_in_one_line():
    with pytest.raises(SlimlmError, match="no method for int; known configs: RTN, GPTQ"):
        apply(tiny_model("llama"), 3)
    with pytest.raises(SlimlmError, match="unknown method 'nope'; valid: rtn, gptq"):
        method_named("nope")


# --- the worked example: a new method in one registry entry -------------------------------------


@dataclass(frozen=True)
class ScaleRows:
    """Toy method: multiply every target weight by ``factor``."""

    factor: float = 0.5
    targets: Targets = field(default_factory=Targets)


def apply_scale_rows(model: nn.Module, config: ScaleRows, calib: torch.Tensor | None) -> nn.Module:
    for module in select_linears(model, config.targets).values():
        module.weight.mul_(config.factor)
    return model


@pytest.fixture
def registered(monkeypatch):
    entry = Method("scale_rows", ScaleRows, apply_scale_rows, "toy: scale weights", calibration=True)
    monkeypatch.setitem(METHODS, entry.name, entry)
    monkeypatch.setitem(METHOD_OF, entry.config, entry)
    return entry


def test_a_registered_method_reaches_apply_recipes_and_refusals(registered):
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    recipe = recipe_from_dict({"steps": [{"method": "scale_rows", "factor": 0.25, "exclude": ["*.q_proj"]}]})
    assert recipe.steps[0] == ScaleRows(factor=0.25, targets=Targets(exclude=("*.q_proj",)))
    assert needs_calibration(list(recipe.steps))
    apply_all(model, list(recipe.steps), CALIB)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w * 0.25)
    with pytest.raises(SlimlmError, match="ScaleRows cannot run lazily .* lazy methods: RTN, GPTQ, AWQ, MixedPrecision"):
        check_lazy(list(recipe.steps))


def test_the_cli_lists_methods_from_the_registry(registered, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, m in METHODS.items():
        assert name in out and m.summary in out
