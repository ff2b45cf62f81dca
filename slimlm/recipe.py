"""Recipes: an ordered list of configs, written as YAML, applied by a plain loop.

    name: rtn-int4-g64
    steps:
      - method: rtn
        scheme: int4-g64             # or {format: int, bits: 4, group_size: 64}
        exclude: ["*.mlp.down_proj"] # globs on full module names
        lm_head: false
        overrides: {"*.self_attn.v_proj": int8-channel}

A step may also be written with the method as its only key and the scheme's
fields inline: ``- rtn: {bits: 4, group_size: 64, symmetric: false}``.

Shorthand (schemes, patterns) is parsed here, once, into typed configs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from slimlm.errors import SlimlmError
from slimlm.methods import METHODS
from slimlm.prune.patterns import parse_pattern
from slimlm.targets import Targets

_TARGET_KEYS = ("include", "exclude", "lm_head", "embedding")
# Scheme fields a step may give inline instead of ``scheme:`` (see formats.parse_scheme).
_SCHEME_KEYS = ("format", "bits", "group_size", "symmetric", "clip_search", "block_size", "double_quant",
                "per_row", "iters", "init", "threshold", "pack_base3")  # fmt: skip


def _normalise(step: Any) -> dict[str, Any]:
    """``{rtn: {...}}`` -> ``{method: rtn, ...}``; inline scheme fields -> ``scheme: {...}``."""
    if isinstance(step, dict) and len(step) == 1 and "method" not in step:
        (method, body), = step.items()
        if method not in METHODS:
            raise SlimlmError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise SlimlmError(f"recipe step {method!r} must map to its fields, e.g. {{bits: 4, group_size: 64}}")
        step = {"method": method, **body}
    if not isinstance(step, dict) or step.get("method") not in METHODS:
        return step
    own = {f.name for f in fields(METHODS[step["method"]].config)}
    if "pattern" in own and "pattern" in step:  # sparsity pattern shorthand: "2:4" -> NM(2, 4)
        step = {**step, "pattern": parse_pattern(step["pattern"])}
    if "scheme" not in own:
        return step
    inline = {k: step[k] for k in _SCHEME_KEYS if k in step and k not in own}
    if inline:
        if "scheme" in step:
            raise SlimlmError(f"give either scheme: or the inline fields {', '.join(inline)}, not both")
        step = {k: v for k, v in step.items() if k not in inline}
        step["scheme"] = {"format": "int", **inline}
    return step


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Any, ...]
    spec: dict[str, Any]  # the YAML as written, recorded in manifests and results


def config_from_dict(step: dict[str, Any]) -> Any:
    """One recipe step (``method`` plus that config's fields) -> a typed config."""
    step = _normalise(step)
    if not isinstance(step, dict) or "method" not in step:
        raise SlimlmError(f"each recipe step needs a 'method' ({', '.join(METHODS)}), got {step!r}")
    kwargs = dict(step)
    method = kwargs.pop("method")
    entry = METHODS.get(method)
    if entry is None:
        raise SlimlmError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    cls = entry.config
    allowed = [f.name for f in fields(cls) if f.name != "targets"] + list(_TARGET_KEYS)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise SlimlmError(f"unknown key(s) {', '.join(unknown)} for method {method}; valid: {', '.join(allowed)}")
    targets = {k: kwargs.pop(k) for k in _TARGET_KEYS if k in kwargs}
    for k in ("include", "exclude"):
        if k in targets:
            targets[k] = tuple([targets[k]] if isinstance(targets[k], str) else targets[k])
    if "overrides" in kwargs:
        if not isinstance(kwargs["overrides"], dict):
            raise SlimlmError("overrides must be a mapping of glob -> scheme, e.g. {'*.down_proj': int8-channel}")
        kwargs["overrides"] = tuple(kwargs["overrides"].items())
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # frozen configs hold tuples
    return cls(targets=Targets(**targets), **kwargs)


def recipe_from_dict(spec: dict[str, Any], *, default_name: str = "recipe") -> Recipe:
    if not isinstance(spec, dict) or not isinstance(spec.get("steps"), list) or not spec["steps"]:
        raise SlimlmError("a recipe is a mapping with a non-empty 'steps' list (each step has a 'method')")
    steps = tuple(config_from_dict(s) for s in spec["steps"])
    return Recipe(name=str(spec.get("name", default_name)), steps=steps, spec=copy.deepcopy(spec))


def shipped_recipes() -> dict[str, Path]:
    folder = resources.files("slimlm") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (see ``shipped_recipes()``) or a YAML file."""
    shipped = shipped_recipes()
    path = shipped.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise SlimlmError(f"no recipe {name_or_path!r}: give a YAML file or one of {', '.join(sorted(shipped))}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SlimlmError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return recipe_from_dict(spec, default_name=path.stem)
