"""Generation's place in the layers: it reads family facts from the adapter table and never imports
compression, measurement or pipelines; drafts built by compressing the target live in pipelines."""

import ast
import dataclasses
from pathlib import Path

import pytest

import slimlm.generation
from slimlm.cli import kv_decoder
from slimlm.errors import SlimlmError
from slimlm.generation.decoder import FAST_FAMILIES, FastDecoder, HFDecoder, make_decoder
from slimlm.models import adapters
from slimlm.models.tiny import tiny_model
from slimlm.pipelines.drafts import make_draft

ABOVE = ("slimlm.api", "slimlm.recipe", "slimlm.methods", "slimlm.targets", "slimlm.quant", "slimlm.prune",
         "slimlm.calib", "slimlm.io", "slimlm.pipelines", "slimlm.eval", "slimlm.cli")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether the import sits inside a function) for every import in a file."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}  # fmt: skip
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in in_function) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, id(node) in in_function))
    return out


def test_generation_imports_nothing_above_it_and_nothing_inside_functions():
    root = Path(slimlm.generation.__file__).parent
    for path in root.rglob("*.py"):
        for module, inside in _imports(path):
            assert not module.startswith(ABOVE), f"{path.relative_to(root)} imports {module}"
            assert not (inside and module.startswith("slimlm")), f"{path.relative_to(root)}: {module} in a function"


def test_the_fast_path_follows_the_adapter_table(monkeypatch):
    assert FAST_FAMILIES == tuple(f for f, a in adapters.ADAPTERS.items() if a.fast_decoder)
    assert isinstance(make_decoder(tiny_model("llama")), FastDecoder)
    off = dataclasses.replace(adapters.ADAPTERS["llama"], fast_decoder=False)
    monkeypatch.setitem(adapters.ADAPTERS, "llama", off)
    assert isinstance(make_decoder(tiny_model("llama")), HFDecoder)


def test_every_layer_sliding_comes_from_the_adapter(monkeypatch):
    model = tiny_model("llama")
    model.config.sliding_window = 7
    assert make_decoder(model).sliding_window is None  # llama: no sliding layers
    monkeypatch.setitem(adapters.ADAPTERS, "llama",
                        dataclasses.replace(adapters.ADAPTERS["llama"], sliding_window_all_layers=True))
    assert make_decoder(model).sliding_window == 7


def test_a_lookup_draft_is_named_by_its_shorthand():
    model = tiny_model("llama")
    assert make_draft("lookup", model, None).name == "lookup"
    draft = make_draft("lookup:2", model, None)
    assert draft.name == "lookup:2" and draft.max_ngram == 2


@pytest.mark.parametrize("kw, pattern", [
    (dict(policy="sinks", budget=None), "--kv-policy sinks needs a budget"),
    (dict(policy=None, budget=8), "--kv-budget needs --kv-policy"),
])  # fmt: skip
def test_the_cli_names_its_kv_flags(kw, pattern):
    with pytest.raises(SlimlmError, match=pattern):
        kv_decoder(make_decoder(tiny_model("llama")), **kw)
