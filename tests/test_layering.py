"""The package's layering (docs/architecture.md): no import cycles, imports only downward, no
imports inside functions except of optional heavy dependencies, and the sibling rules."""

import ast
from pathlib import Path

import pytest

import slimlm

ROOT = Path(slimlm.__file__).parent

# Each top-level module or package of slimlm and its layer: a module imports only its own layer or lower.
LAYERS = {
    0: ("__init__", "errors", "validate", "fsutil"),
    1: ("formats", "solvers"),
    2: ("kernels",),
    3: ("nn",),
    4: ("models", "data", "eval", "targets", "io", "generation"),
    5: ("calib",),
    6: ("quant", "prune", "train", "distill", "lowrank", "peft"),
    7: ("methods", "api", "recipe"),
    8: ("pipelines", "export", "sweep"),
    9: ("cli", "cli_parser"),
}
LAYER_OF = {name: rank for rank, names in LAYERS.items() for name in names}
# Within a layer, pairs that must not meet: siblings stay independent, and decoding does not
# reach into measurement or checkpoint code (a compressed draft is a pipeline above both).
FORBIDDEN = {("quant", "prune"), ("prune", "quant"), ("generation", "eval"), ("generation", "io"),
             ("generation", "targets"), ("lowrank", "quant"), ("lowrank", "prune")}  # fmt: skip
# The only third-party imports allowed inside functions: optional or heavy-and-rarely-needed.
OPTIONAL = {"datasets", "gguf", "ray", "lm_eval", "matplotlib", "plotly", "pydoc_data", "fcntl", "resource",
            "tokenizers", "transformers.modeling_gguf_pytorch_utils", "compressed_tensors"}  # fmt: skip


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in ROOT.rglob("*.py")}  # fmt: skip


MODULES = _modules()


def _imports(path: Path, name: str):
    """(target module, line, inside a function?) for every slimlm import in one file."""
    tree = ast.parse(path.read_text())
    funcs = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}  # fmt: skip
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            yield t, node.lineno, id(node) in funcs


def _packages_run(src: str, dst: str) -> list[str]:
    """Importing ``dst`` from ``src`` runs ``dst`` and the ``__init__`` of each package above it that is
    not already above ``src`` (those are being imported anyway): all of them are edges."""
    ancestors = {src.rsplit(".", k)[0] for k in range(src.count(".") + 1)}
    parts = dst.split(".")
    return [p for p in (".".join(parts[:k]) for k in range(2, len(parts) + 1)) if p not in ancestors]


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for t, _, _ in _imports(p, m):
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != m and t.split(".")[0] == "slimlm":
                edges[m].update(x for x in _packages_run(m, t) if x in MODULES and x != m)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_a_submodule_runs_its_packages():
    # slimlm.io importing slimlm.models.adapters runs slimlm/models/__init__.py too, so a package
    # whose __init__ imports slimlm.io back is a cycle even though no module names the other.
    assert _packages_run("slimlm.io", "slimlm.models.adapters") == ["slimlm.models", "slimlm.models.adapters"]
    assert _packages_run("slimlm.models.lazy", "slimlm.models.checks") == ["slimlm.models.checks"]


def test_every_top_level_module_has_a_layer():
    assert {_top(m) for m in MODULES} <= set(LAYER_OF)


def test_imports_go_downward_and_siblings_stay_apart():
    bad = []
    for src, targets in _graph().items():
        for dst in targets:
            a, b = _top(src), _top(dst)
            if a == b:
                continue
            if LAYER_OF[b] > LAYER_OF[a] or (a, b) in FORBIDDEN:
                bad.append(f"{src} -> {dst}")
    assert bad == []


def test_no_imports_inside_functions_but_optional_dependencies():
    bad = []
    for m, p in MODULES.items():
        for t, line, inside in _imports(p, m):
            if inside and t.split(".")[0] not in OPTIONAL and t not in OPTIONAL and _top(m) != "cli":
                bad.append(f"{p.relative_to(ROOT.parent)}:{line} imports {t}")
    assert bad == []
