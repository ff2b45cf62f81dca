"""The fast two-pass GPTQ walk (statistics pass stopped after the last hook, no re-run of the last block, inlined
affine column loop) stores the same packed codes as the plain walk with the generic column loop."""

import pytest
import torch

from slimlm.calib import StatsSpec, calibrate_blocks
from slimlm.nn import QuantLinear, linear_weight
from slimlm.models.tiny import tiny_model
from slimlm.quant import GPTQ, apply_gptq
from slimlm.solvers import column_grid, obs_solve, prepare
from slimlm.targets import replace_module, scheme_plan

CALIB = torch.randint(3, 512, (6, 40), generator=torch.Generator().manual_seed(0))


def _reference(model, config):
    """Full statistics passes, every block re-run, each linear through the generic OBS loop."""
    plan = scheme_plan(model, config.targets, config.scheme_for)

    def on_block(ctx):
        for name in ctx.linears:
            module, scheme = plan[name]
            W, _ = linear_weight(module)
            prob = prepare(W, ctx.stats[name].H, percdamp=config.percdamp, act_order=config.act_order)
            grid = column_grid(prob.W, scheme, prob.perm, static_groups=config.static_groups)
            obs_solve(prob.W[:, prob.perm], prob.Hinv, grid, on_block=grid.on_block, blocksize=config.blocksize)
            replace_module(model, name, QuantLinear.from_linear(module, scheme, qweight=grid.result(tuple(W.shape))))
        return True

    calibrate_blocks(model, CALIB, on_block=on_block, spec=StatsSpec(hessian=True), batch_size=config.batch_size)
    return model


def _packed(model):
    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for k, v in m.portable_tensors().items()}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scheme,act_order", [("int4-g16", True), ("int3-channel", False), ("int4-g32-sym", True)])
def test_same_packed_codes_as_the_plain_walk(family, scheme, act_order):
    config = GPTQ(scheme=scheme, act_order=act_order, batch_size=4, blocksize=24, true_sequential=False)
    fast = _packed(apply_gptq(tiny_model(family), config, CALIB))
    slow = _packed(_reference(tiny_model(family), config))
    assert fast.keys() == slow.keys() and len(fast) > 0
    for k in fast:
        assert torch.equal(fast[k], slow[k]), k


def test_bfloat16_calibration_is_close_to_float32_and_not_equal():
    """``calib_dtype="bfloat16"`` changes the Hessians a little: most codes agree, not all."""
    f32 = _packed(apply_gptq(tiny_model("llama"), GPTQ(scheme="int4-g16", batch_size=4), CALIB))
    bf16 = _packed(apply_gptq(tiny_model("llama"), GPTQ(scheme="int4-g16", batch_size=4, calib_dtype="bfloat16"),
                              CALIB))  # fmt: skip
    codes = [k for k in f32 if k.endswith(".codes")]
    agree = sum(int((f32[k] == bf16[k]).sum()) for k in codes) / sum(f32[k].numel() for k in codes)
    assert 0.8 < agree < 1.0, agree  # 94% of the packed bytes on this model


def test_calib_dtype_refusal():
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="calib_dtype must be one of float32, bfloat16, got 'float16'"):
        GPTQ(calib_dtype="float16")
