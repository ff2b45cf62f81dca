"""The one-pass ("true sequential") walk against a plain reference: one full forward per group of linears."""

import pytest
import torch
from torch import nn

from slimlm.calib import StatsSpec
from slimlm.calib.runner import calibrate_linears
from slimlm.calib.sequential import _Gate
from slimlm.errors import SlimlmError
from slimlm.models.adapters import block_linears, decoder_blocks, get_adapter
from slimlm.models.tiny import TINY_FAMILIES, tiny_model
from slimlm.nn import linear_weight
from slimlm.nn.runtime import replace_module

CALIB = torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(0))
CALIB_8x32 = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(1))


def _twin(base: nn.Module) -> nn.Module:
    """A fresh tiny Llama holding ``base``'s weights (each walk starts from the same model)."""
    model = tiny_model("llama")
    model.load_state_dict(base.state_dict())
    return model


def _rounded(module: nn.Module) -> nn.Module:
    """A new linear with the weight rounded to a coarse grid: a rewrite whose effect shows downstream."""
    W, b = linear_weight(module)  # (out, in), also for GPT-2's Conv1D
    new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(torch.round(W * 8) / 8)
        if b is not None:
            new.bias.copy_(b)
    return new


def _reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each group's Hessian from a full forward of the model with every earlier group rewritten."""
    adapter, found = get_adapter(model), {}
    for i, block in enumerate(decoder_blocks(model)):
        linears = block_linears(block, adapter)
        for g in adapter.groups:
            xs = []
            h = linears[g.linears[0]].register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
            with torch.no_grad():
                model(CALIB[:4]), model(CALIB[4:])
            h.remove()
            X = torch.cat(xs).double()
            for rel in g.linears:
                name = f"{adapter.blocks}.{i}.{rel}"
                found[name] = 2 * X.t() @ X / X.shape[0]
                replace_module(model, name, _rounded(model.get_submodule(name)))
    return found


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_group_is_fixed_from_the_inputs_of_the_groups_fixed_before_it(family):
    reference = tiny_model(family)
    model = tiny_model(family)
    model.load_state_dict(reference.state_dict())
    expected = _reference(reference)
    got = {}

    def fix(name, stats):
        got[name] = stats.H.double().clone()
        replace_module(model, name, _rounded(model.get_submodule(name) if not isinstance(
            model.get_submodule(name), _Gate) else model.get_submodule(name).inner))

    calibrate_linears(model, CALIB, list(expected), fix, spec=StatsSpec(hessian=True), batch_size=4, sequential=True)
    assert list(got) == list(expected)  # every linear once, in forward order
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not any(isinstance(m, _Gate) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(CALIB).logits, reference(CALIB).logits, rtol=1e-4, atol=1e-4)


def test_mini_batches_that_reach_different_linears_are_refused_and_the_block_is_restored():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: x if x.shape[0] == 2 else forward(x)  # the last mini-batch skips the MLP
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)]
    with pytest.raises(SlimlmError, match="reached different linears.*true_sequential: false"):
        calibrate_linears(model, CALIB, names, lambda n, s: None, spec=StatsSpec(sq_sum=True), batch_size=4,
                          sequential=True)  # fmt: skip
    assert not any(isinstance(m, _Gate) for m in model.modules())
    assert isinstance(mlp.down_proj, nn.Linear)


def test_an_error_in_fix_reaches_the_caller_and_leaves_no_gate_behind():
    model = tiny_model("llama")

    def fix(name, stats):
        if name.endswith("o_proj"):
            raise SlimlmError("cannot fix o_proj")

    names = [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)]
    with pytest.raises(SlimlmError, match="cannot fix o_proj"):
        calibrate_linears(model, CALIB, names, fix, spec=StatsSpec(sq_sum=True), batch_size=2, sequential=True)
    assert not any(isinstance(m, _Gate) for m in model.modules())


def test_an_error_inside_a_forward_reaches_the_caller_and_the_other_forwards_are_unwound():
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    forward = mlp.forward

    def failing(x):
        if x.shape[0] == 2:
            raise RuntimeError("forward failed in the last mini-batch")
        return forward(x)

    mlp.forward = failing
    names = [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)]
    with pytest.raises(RuntimeError, match="forward failed in the last mini-batch"):
        calibrate_linears(model, CALIB, names, lambda n, s: None, spec=StatsSpec(sq_sum=True), batch_size=4,
                          sequential=True)  # fmt: skip
    assert not any(isinstance(m, _Gate) for m in model.modules())


def test_the_forwards_run_on_the_calling_thread():
    """One OS thread: torch's thread pool and allocator see the walk as they see the two-pass one."""
    import threading

    model = tiny_model("llama")
    seen = set()
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda m, a: seen.add(threading.get_ident()))
    names = [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)]
    calibrate_linears(model, CALIB, names, lambda n, s: None, spec=StatsSpec(sq_sum=True), batch_size=2,
                      sequential=True)  # fmt: skip
    assert seen == {threading.get_ident()}


def test_each_forward_keeps_its_autocast_and_the_rewrites_and_caller_run_without_it():
    """The forwards run under autocast as greenlets of one thread: the mode must follow each side of a switch."""
    model = tiny_model("llama")
    inside, at_fix = [], []
    for name, m in model.named_modules():
        if ".layers." in name and isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda mod, a: inside.append(torch.is_autocast_enabled("cpu")))
    names = [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)]
    grad = torch.is_grad_enabled()
    calibrate_linears(model, CALIB, names, lambda n, s: at_fix.append(torch.is_autocast_enabled("cpu")),
                      spec=StatsSpec(sq_sum=True), batch_size=2, autocast=torch.bfloat16, sequential=True)  # fmt: skip
    assert inside and all(inside)
    assert at_fix and not any(at_fix)
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled() == grad


def test_gptq_true_sequential_quantizes_every_linear_close_to_the_two_pass_walk():
    from slimlm.api import apply
    from slimlm.nn import QuantLinear
    from slimlm.quant.gptq_handler import GPTQ

    base, calib = tiny_model("llama"), CALIB_8x32
    errors = {}
    for seq in (False, True):
        model = _twin(base)
        apply(model, GPTQ(scheme="int4-g32", true_sequential=seq), calib=calib)
        linears = [m for n, m in model.named_modules() if ".layers." in n and isinstance(m, (nn.Linear, QuantLinear))]
        assert linears and all(isinstance(m, QuantLinear) for m in linears)
        with torch.no_grad():
            errors[seq] = (model(calib).logits - base(calib).logits).pow(2).mean().item()
    assert errors[True] < 1.5 * errors[False]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_pruning_true_sequential_prunes_every_linear_from_the_pruned_groups_before_it(method):
    from slimlm.api import apply
    from slimlm.nn import SparseLinear
    from slimlm.prune import SparseGPT, Wanda

    base, calib = tiny_model("llama"), CALIB_8x32
    masks = {}
    for seq in (False, True):
        model = _twin(base)
        config = (SparseGPT if method == "sparsegpt" else Wanda)(sparsity=0.5, true_sequential=seq)
        apply(model, config, calib=calib)
        masks[seq] = {n: m.keep_mask() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert masks[True].keys() == masks[False].keys() and len(masks[True]) == 7 * len(decoder_blocks(base))
    assert all(k.float().mean() == 0.5 for k in masks[True].values())
    first = "model.layers.0.self_attn.q_proj"  # the first group: the same float inputs in both walks
    assert torch.equal(masks[True][first], masks[False][first])
    later = [n for n in masks[True] if not torch.equal(masks[True][n], masks[False][n])]
    assert later and first not in later  # later groups saw the pruned ones before them
