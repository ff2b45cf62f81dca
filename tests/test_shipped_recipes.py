"""Every shipped recipe runs end to end on a tiny model and its checkpoint reloads bit-identically."""

import dataclasses

import pytest
import torch

from slimlm.api import apply_all, needs_calibration
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.recipe import load_recipe, shipped_recipes
from slimlm.prune.structured_config import PruneDepth
from slimlm.train import TrainConfig

CALIB = torch.randint(3, 512, (8, 272), generator=torch.Generator().manual_seed(0))
IDS = torch.arange(3, 35).reshape(1, 32)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipe_runs_and_round_trips(tmp_path, name):
    recipe = load_recipe(name)
    steps = list(recipe.steps)
    # methods that train: the same method with a schedule a unit test can afford
    steps = [dataclasses.replace(s, steps=3, seq_len=64, batch_size=2) if isinstance(s, TrainConfig) else s
             for s in steps]
    # the tiny model has 2 layers: a recipe that drops most layers drops one
    steps = [dataclasses.replace(s, layers=1) if isinstance(s, PruneDepth) else s for s in steps]
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(IDS).logits
    apply_all(model, steps, CALIB if needs_calibration(steps) else None)
    out = save_compressed(model, tiny_tokenizer(), tmp_path / name, base_model="tiny", recipe=recipe.spec)
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        after = model(IDS).logits
        assert torch.equal(loaded(IDS).logits, after)
    assert after.isfinite().all() and not torch.equal(after, before)
