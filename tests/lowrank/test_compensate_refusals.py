"""EoRA's refusals: one line each, naming the fix, and the model untouched when refused at planning."""

import pytest
import torch

from slimlm.api import apply, apply_all
from slimlm.errors import SlimlmError
from slimlm.export import export
from slimlm.export.compressed_tensors import export_compressed_tensors
from slimlm.io import save_compressed
from slimlm.lowrank import EoRA
from slimlm.methods import METHODS
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.quant import RTN
from slimlm.quant.awq_handler import AWQ
from slimlm.recipe import config_from_dict
from slimlm.targets import Targets, candidate_linears

CALIB = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))


def _refused(match, fn, *args, **kwargs):
    with pytest.raises(SlimlmError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-3), "rank must be a positive int"),
    (dict(overrides=(("*.down_proj", 0),)), "override '\\*.down_proj' must be a positive int"),
    (dict(whiten="yes"), "whiten must be true or false"),
    (dict(damp=2.0), "damp must be a number in \\[0, 1\\]"),
    (dict(side_dtype="int8"), "side_dtype must be one of float16, bfloat16, float32"),
])  # fmt: skip
def test_bad_configs_are_refused_on_construction(kwargs, match):
    _refused(match, EoRA, **kwargs)


def test_recipe_keys_map_to_the_config():
    c = config_from_dict({"method": "eora", "rank": 16, "overrides": {"*.mlp.down_proj": 64}, "whiten": False})
    assert c == EoRA(rank=16, overrides=(("*.mlp.down_proj", 64),), whiten=False)
    assert METHODS["eora"].needs_calibration(EoRA()) and not METHODS["eora"].needs_calibration(c)


def _quantized():
    base = tiny_model("llama")
    q = tiny_model("llama")
    apply(q, RTN(scheme="int3-g32"))
    return base, q


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_rank_beyond_the_layer_is_refused_before_anything_changes():
    base, q = _quantized()
    before = _state(q)
    _refused("rank 65 exceeds min\\(in, out\\) = 64 of model.layers.0.self_attn.q_proj; use a rank in 1..64",
             apply, q, EoRA(rank=65), CALIB, original=base)
    _refused("rank 100 exceeds min\\(in, out\\) = 64 of model.layers.0.mlp.down_proj",
             apply, q, EoRA(rank=8, overrides=(("*.down_proj", 100),)), CALIB, original=base)
    assert _unchanged(q, before)


def test_no_quantized_target_no_original_and_a_second_step_are_refused():
    base, q = _quantized()
    _refused("no quantized linear among its 14 targets .*put eora after a gptq, rtn or sparsegpt step",
             apply, tiny_model("llama"), EoRA(rank=4), CALIB, original=base)
    _refused("needs the float weights that quantization replaced: run it in a recipe after the quantization step, "
             "or pass original=", apply, q, EoRA(rank=4), CALIB)
    _refused("original model's model.layers.0.self_attn.q_proj is already compressed", apply, q, EoRA(rank=4),
             CALIB, original=q)
    _refused("eora needs calibration token ids", apply, q, EoRA(rank=4), None, original=base)
    _refused("does not read the original model: original= is for eora", apply, q, RTN(), original=base)
    apply(q, EoRA(rank=4, whiten=False), original=base)
    _refused("model.layers.0.self_attn.q_proj is already compensated", apply, q, EoRA(rank=4, whiten=False),
             original=base)


def test_a_recipe_with_eora_first_or_after_awq_is_refused():
    # eora as the recipe's first step: nothing is quantized yet
    _refused("no quantized linear", apply_all, tiny_model("llama"), [EoRA(rank=4), RTN()], CALIB)
    # AWQ folds its scales into the norms: the original's weights are in other coordinates
    before = tiny_model("llama")
    q = tiny_model("llama")
    _refused("but model.layers.0.input_layernorm.weight changed .*put eora after a gptq, rtn or sparsegpt step",
             apply_all, q, [AWQ(scheme="int3-g32"), EoRA(rank=4)], CALIB)
    # a recipe that quantized only some targets compensates those
    apply_all(before, [RTN(targets=Targets(include=("*.mlp.*",))), EoRA(rank=4, whiten=False)])
    kinds = {n.rsplit(".", 2)[-2]: type(m).__name__ for n, m in candidate_linears(before).items()}
    assert kinds == {"self_attn": "Linear", "mlp": "CompensatedLinear"}


def test_gguf_and_compressed_tensors_exports_refuse_naming_the_fix(tmp_path):
    base, q = _quantized()
    apply(q, EoRA(rank=4, whiten=False), original=base)
    ck = save_compressed(q, tiny_tokenizer(), tmp_path / "ckpt")
    _refused("CompensatedLinear\\) holds a float low-rank side path .*GGUF has no place for; compress with the same "
             "recipe without its eora step", export, ck, tmp_path / "m.gguf", format="gguf")
    _refused("CompensatedLinear\\) holds a float low-rank side path .*compressed-tensors cannot hold; compress with "
             "the same recipe without its eora step", export_compressed_tensors, ck, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
