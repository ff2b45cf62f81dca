"""Bad input to the PEFT methods: one line naming the problem and the fix, and nothing changed or written."""

import pytest

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.io import save_compressed
from slimlm.models.tiny import tiny_tokenizer
from slimlm.peft import DoRA, LoRA, PromptTuning, QLoRA, save_adapter
from slimlm.peft.merge import adapter_layers
from slimlm.prune.handlers import Magnitude
from slimlm.quant.rtn import RTN
from slimlm.recipe import recipe_from_dict
from slimlm.targets import Targets
from tests.peft.helpers import FAST, learnable_calib, model, snapshot

CALIB = learnable_calib()


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be > 0"),
    (dict(r=-2), "r must be > 0"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(requantize=True), "set merge: true"),
    (dict(loss="mse"), "loss must be ce"),
])  # fmt: skip
def test_bad_lora_configs(kwargs, match):
    with pytest.raises(SlimlmError, match=match):
        LoRA(**kwargs)


def test_prompt_tuning_takes_no_targets():
    with pytest.raises(SlimlmError, match="not linears"):
        PromptTuning(targets=Targets(include=("*.q_proj",)))


def _refused(m, cfg, match):
    before = snapshot(m)
    with pytest.raises(SlimlmError, match=match) as e:
        apply(m, cfg, CALIB)
    assert "\n" not in str(e.value)
    after = snapshot(m)
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    assert not adapter_layers(m)


def test_rank_above_min_in_out_is_refused_before_anything_changes():
    _refused(model(), LoRA(r=65, **FAST), r"exceeds min\(in, out\) = 64")


def test_qlora_refusals_come_before_the_base_is_quantized():
    _refused(model(), QLoRA(r=65, **FAST), "exceeds min")  # the float base stays float
    _refused(model(), QLoRA(r=4, loss="kl", **FAST), "needs a teacher")


def test_targets_that_match_nothing():
    _refused(model(), LoRA(targets=Targets(include=("*.nothing",)), **FAST), "select no linear")


def test_merge_into_a_format_that_cannot_hold_it():
    _refused(apply(model(), RTN(scheme="nf4")), LoRA(r=4, merge=True, **FAST), "merging changes its codes")
    _refused(apply(model(), Magnitude(sparsity=0.5)), LoRA(r=4, merge=True, requantize=True, **FAST),
             "cannot hold a merged dense")  # fmt: skip


def test_dora_needs_a_float_base():
    _refused(apply(model(), RTN(scheme="nf4")), DoRA(r=4, **FAST), "DoRA needs float target weights")


def test_saving_a_model_without_adapter_writes_nothing(tmp_path):
    with pytest.raises(SlimlmError, match="no adapter to save"):
        save_adapter(model(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_steps_parse():
    steps = recipe_from_dict({"steps": [{"method": "rtn", "scheme": "nf4"},
                                        {"method": "qlora", "r": 8, "loss": "kl", "include": ["*.mlp.*"]}]}).steps
    assert isinstance(steps[1], QLoRA) and steps[1].r == 8 and steps[1].targets.include == ("*.mlp.*",)


def test_save_compressed_refuses_a_model_with_adapters_beside_its_base(tmp_path):
    for cfg in (LoRA(r=4, **FAST), PromptTuning(n_tokens=2, **FAST)):
        m = apply(model(), cfg, CALIB)
        with pytest.raises(SlimlmError, match="carries a PEFT adapter"):
            save_compressed(m, tiny_tokenizer(), tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("step", [{"method": "lora", "r": 4}, {"method": "adapters"}, {"method": "prompt_tuning"}])
def test_compress_refuses_a_step_that_leaves_an_adapter_before_any_work(tmp_path, step):
    from slimlm.pipelines.compress import compress

    rec = recipe_from_dict({"name": "adapter", "steps": [{"method": "rtn", "scheme": "int8-channel"}, step]})
    out = tmp_path / "out"
    with pytest.raises(SlimlmError, match="keeps its adapter beside the base"):
        compress(str(tmp_path / "no-model-needed"), rec, out=out)  # refused before the model is read
    assert not out.exists()


def test_compress_accepts_merged_lora_and_bitfit():
    from slimlm.pipelines.compress import _refuse_adapter_steps

    _refuse_adapter_steps([LoRA(r=4, merge=True), RTN(), recipe_from_dict(
        {"name": "b", "steps": [{"method": "bitfit"}, {"method": "bitfit", "zero_biases": True}]}).steps[0]])
