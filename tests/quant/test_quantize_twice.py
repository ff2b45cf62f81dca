"""A second quantization of an already quantized linear is refused (one line), never skipped or re-rounded."""

import pytest
import torch

from slimlm.api import apply, apply_all
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed, save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import QuantLinear
from slimlm.prune.handlers import SparseGPT
from slimlm.quant import RTN
from slimlm.quant.awq_handler import AWQ
from slimlm.quant.gptq_handler import GPTQ
from slimlm.targets import Targets

CALIB = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
MLP = Targets(include=("*.mlp.*",))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(before, m):
    after = m.state_dict()
    return list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("second", [RTN(scheme="int8-g16"), GPTQ(scheme="int4-g16"), AWQ(scheme="int4-g16", grid=3)],
                         ids=["rtn", "gptq", "awq"])
def test_quantizing_after_rtn_is_refused_and_leaves_the_model_as_rtn_made_it(second):
    m = apply(tiny_model("llama"), RTN(scheme="int4-g16"))
    before = _state(m)
    with pytest.raises(SlimlmError, match=r"model.layers.0.self_attn.q_proj is already quantized \(QuantLinear\); "
                                          r"a second quantization step would round rounded weights") as e:
        apply(m, second, CALIB)
    assert "\n" not in str(e.value) and _unchanged(before, m)


def test_a_recipe_with_two_rtn_steps_stops_at_the_second():
    m = tiny_model("llama")
    with pytest.raises(SlimlmError, match="already quantized"):
        apply_all(m, [RTN(scheme="int4-g16"), RTN(scheme="int8-g16")])
    assert all(q.scheme.bits == 4 for q in m.modules() if isinstance(q, QuantLinear))  # the first step's codes


def test_quantizing_a_loaded_quantized_checkpoint_is_refused(tmp_path):
    m = apply(tiny_model("llama"), GPTQ(scheme="int4-g16"), CALIB)
    loaded = load_compressed(save_compressed(m, tiny_tokenizer(), tmp_path / "g"))[0]
    with pytest.raises(SlimlmError, match="already quantized"):
        apply(loaded, RTN())


def test_sparsegpt_joint_codes_are_not_rerounded():
    m = apply(tiny_model("llama"), SparseGPT(sparsity=0.5, scheme="int4-g16"), CALIB)
    with pytest.raises(SlimlmError, match=r"already quantized \(SparseQuantLinear\)"):
        apply(m, RTN(scheme="int8-g16"))


def test_disjoint_quantization_steps_compose():
    """What is allowed: a second step on linears the first left alone (here the attention after the MLP)."""
    m = apply_all(tiny_model("llama"), [RTN(scheme="int4-g16", targets=MLP),
                                        RTN(scheme="int8-g16", targets=Targets(include=("*.self_attn.*",)))])
    bits = {n.split(".")[-2]: q.scheme.bits for n, q in m.named_modules() if isinstance(q, QuantLinear)}
    assert bits == {"mlp": 4, "self_attn": 8}
