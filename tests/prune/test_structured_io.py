"""Structured pruning: checkpoints (slimlm and stock transformers), recipes, the CLI, and refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.api import apply
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerGroup
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer
from slimlm.prune.structured_config import PruneDepth, PruneWidth, Structured
from slimlm.quant import RTN
from slimlm.recipe import recipe_from_dict
from slimlm.targets import Targets

CALIB = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(1))
FAST = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed", "--calib-samples", "2"]


def _bytes(d):
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("config", [Structured(params=0.3, mode="width"), PruneDepth(layers=1)], ids=["width", "depth"])
def test_pruned_model_saves_and_reloads_in_slimlm_and_stock_transformers(tmp_path, family, config):
    tok = tiny_tokenizer()
    dense = save_compressed(tiny_model(family), tok, tmp_path / "dense")
    model = apply(tiny_model(family), config, CALIB)
    with torch.no_grad():
        want = model(IDS).logits
    out = save_compressed(model, tok, tmp_path / "pruned", base_model="tiny")
    loaded, _ = load_compressed(out)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, want)
        assert torch.equal(stock(IDS).logits, want)
    assert stock.config.num_hidden_layers == model.config.num_hidden_layers
    assert getattr(stock.config, "head_dim", None) == getattr(model.config, "head_dim", None)  # qwen2: absent unless set
    assert _bytes(out) < 0.85 * _bytes(dense)


def test_recipe_steps_parse_into_configs():
    recipe = recipe_from_dict({"steps": [
        {"method": "prune_width", "heads": 0.5, "neurons": 32},
        {"prune_depth": {"layers": 1, "metric": "perplexity"}},
        {"method": "structured", "params": 0.25, "mode": "depth"},
    ]})  # fmt: skip
    assert recipe.steps == (PruneWidth(heads=0.5, neurons=32), PruneDepth(layers=1, metric="perplexity"),
                            Structured(params=0.25, mode="depth"))  # fmt: skip


@pytest.fixture()
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("recipe", ["structured-width-25", "structured-depth-25"])
def test_cli_compress_with_a_structured_recipe(capsys, tmp_path, _cache, recipe):
    src = save_tiny_model_dir(tmp_path / "tiny", family="llama")
    out = tmp_path / "c"
    assert main(["compress", "--model", str(src), "--recipe", recipe, "--out", str(out), *FAST]) == 0
    assert "saved to" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    if recipe.startswith("structured-depth"):
        assert saved["num_hidden_layers"] == 1
    else:
        assert saved["intermediate_size"] < 128
    assert main(["eval", str(out), *FAST[:-2], "--json", str(tmp_path / "r.json")]) == 0  # base from the manifest
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["quality"]["kld"] > 0 and result["size"]["params"] < 0.9 * 106_000


# ---------------------------------------------------------------- refusals: one line naming the fix


@pytest.mark.parametrize("make, pattern", [
    (lambda: PruneWidth(neurons=1.0), "fraction outside [0, 1)"),
    (lambda: PruneWidth(neurons=-3), "must be >= 0"),
    (lambda: PruneWidth(heads="half"), "count (int >= 0) or a fraction"),
    (lambda: PruneWidth(heads=True), "count (int >= 0) or a fraction"),
    (lambda: PruneWidth(heads=2, groups=1), "not both"),
    (lambda: PruneWidth(neurons=3, targets=Targets(exclude=("*.mlp.*",))), "include/exclude/lm_head are not supported"),
    (lambda: PruneDepth(layers=1.5), "fraction outside [0, 1)"),
    (lambda: PruneDepth(layers=1, metric="angular"), "valid: block_importance, perplexity"),
    (lambda: PruneDepth(layers=1, ppl_samples=0), "ppl_samples must be a positive int"),
    (lambda: Structured(params=1.0), "fraction in [0, 1)"),
    (lambda: Structured(params=-0.1), "fraction in [0, 1)"),
    (lambda: Structured(mode="both"), "valid: width, depth"),
    (lambda: Structured(attention="mlp"), "valid: search, groups, heads, none"),
    (lambda: Structured(search_samples=0), "search_samples must be a positive int"),
    (lambda: Structured(batch_size=0), "batch_size must be a positive int"),
])  # fmt: skip
def test_bad_configs_are_refused(make, pattern):
    with pytest.raises(SlimlmError, match=None) as e:
        make()
    assert pattern in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("config, pattern", [
    (PruneWidth(heads=4), "a group holds only 2"),  # 4 heads / 2 KV groups of 2: 2 per group is all of them
    (PruneWidth(heads=0.9), "a group holds only 2"),
    (PruneWidth(heads=1), "does not split evenly over the 2 KV groups"),
    (PruneWidth(groups=2), "keep at least one (valid: 0..1)"),
    (PruneWidth(neurons=128), "keep at least one (valid: 0..127)"),
    (PruneDepth(layers=2), "removes 2 of the 2 decoder layers; keep at least one"),
    (Structured(params=0.9, mode="depth"), "depth pruning removes at most"),
    (Structured(params=0.9, mode="width"), "more than width pruning can take"),
])  # fmt: skip
def test_amounts_the_model_cannot_take_are_refused(config, pattern):
    model = tiny_model("llama")
    with pytest.raises(SlimlmError) as e:
        apply(model, config, CALIB)
    assert pattern in str(e.value) and "\n" not in str(e.value)
    assert model.config.num_attention_heads == 4 and model.config.num_hidden_layers == 2  # untouched


def test_unsupported_models_and_missing_calibration_are_refused():
    for family in ("opt", "gpt2", "phi3"):
        with pytest.raises(SlimlmError, match=f"does not support model type '{family}'; supported: .*llama"):
            apply(tiny_model(family), PruneDepth(layers=1), CALIB)
    with pytest.raises(SlimlmError, match="needs calibration token ids"):
        apply(tiny_model("llama"), PruneWidth(neurons=8), None)
    quantized = apply(tiny_model("llama"), RTN(scheme=IntScheme(4, granularity=PerGroup(16))))
    with pytest.raises(SlimlmError, match="QuantLinear: structured pruning needs float nn.Linear weights; prune before"):
        apply(quantized, PruneWidth(neurons=8), CALIB)
