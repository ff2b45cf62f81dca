"""load_adapter checks everything before it touches the model: a refusal leaves the state dict as it was."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.peft import DoRA, IA3, LoRA, PromptTuning, load_adapter, save_adapter
from slimlm.peft.config import Adapters
from slimlm.peft.save import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD
from tests.peft.helpers import FAST, learnable_calib, model

CALIB = learnable_calib()
ONE = {**FAST, "steps": 1}
KINDS = {"lora": LoRA(r=4, **ONE), "dora": DoRA(r=4, **ONE), "ia3": IA3(**ONE), "adapters": Adapters(size=4, **ONE),
         "prompt": PromptTuning(n_tokens=2, **ONE)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, cfg in KINDS.items():
        save_adapter(apply(model(), cfg, CALIB), root / name)
    return root


def _copy(saved, kind, tmp_path):
    return shutil.copytree(saved / kind, tmp_path / kind)


def _edit_tensors(path, edit):
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / ADAPTER_WEIGHTS))


def _first(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def _drop(part):
    return lambda t: t.pop(_first(t, part))


def _reshape(part):
    def edit(t):
        k = _first(t, part)
        t[k] = torch.zeros(t[k].shape[0] + 1, *t[k].shape[1:])
    return edit


def _truncate(path):
    data = (path / ADAPTER_WEIGHTS).read_bytes()
    (path / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])


def _retarget(path):
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg["target_modules"] = [*cfg["target_modules"], "model.layers.7.mlp.up_proj"]
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))


CASES = {
    "weights missing": ("lora", lambda p: (p / ADAPTER_WEIGHTS).unlink(), f"{ADAPTER_WEIGHTS} is missing or damaged"),
    "weights truncated": ("lora", _truncate, f"{ADAPTER_WEIGHTS} is missing or damaged"),
    "config missing": ("lora", lambda p: (p / ADAPTER_CONFIG).unlink(), "adapter_config.json is missing or damaged"),
    "record damaged": ("lora", lambda p: (p / RECORD).write_text("{nope"), "slimlm_adapter.json is damaged"),
    "lora tensor missing": ("lora", lambda p: _edit_tensors(p, _drop("lora_B")), "lacks 1 adapter tensor"),
    "dora magnitude missing": ("dora", lambda p: _edit_tensors(p, _drop("magnitude")), "lacks 1 adapter tensor"),
    "ia3 tensor missing": ("ia3", lambda p: _edit_tensors(p, _drop("ia3_l")), "lacks 1 adapter tensor"),
    "lora shape": ("lora", lambda p: _edit_tensors(p, _reshape("lora_A")), "has shape .* needs"),
    "extra tensor": ("lora", lambda p: _edit_tensors(p, lambda t: t.update(stray=torch.zeros(1))),
                     "does not describe, e.g. stray"),
    "target the model lacks": ("lora", _retarget, "targets model.layers.7.mlp.up_proj, which this model lacks"),
    "houlsby tensor missing": ("adapters", lambda p: _edit_tensors(p, _drop("up.weight")), "lacks 1 adapter tensor"),
    "prompt shape": ("prompt", lambda p: _edit_tensors(p, _reshape("prompt")),
                     "has shape \\(3, 64\\), this model needs \\(2, 64\\)"),
}


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_adapter_is_refused_before_the_model_changes(saved, tmp_path, case):
    kind, damage, pattern = CASES[case]
    path = _copy(saved, kind, tmp_path)
    damage(path)
    m = model()
    before, modules = _state(m), [type(x).__name__ for x in m.modules()]
    with pytest.raises(SlimlmError, match=pattern) as e:
        load_adapter(m, path)
    assert "\n" not in str(e.value)
    after = _state(m)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(x).__name__ for x in m.modules()] == modules and not hasattr(m, "soft_prompt")


def test_another_base_is_refused_and_the_model_is_unchanged(saved):
    m = model(seed=1)
    before = _state(m)
    with pytest.raises(SlimlmError, match="trained on another base"):
        load_adapter(m, saved / "lora")
    after = _state(m)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_intact_adapters_of_every_kind_load(saved, kind):
    m = load_adapter(model(), saved / kind)
    assert any(p in k for k in m.state_dict() for p in ("lora_", "ia3_", ".adapter.")) or hasattr(m, "soft_prompt")
