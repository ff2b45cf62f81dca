import itertools

import pytest
import torch

from slimlm.calib import StatsSpec, calibrate_blocks
from slimlm.errors import SlimlmError
from slimlm.models.size import measure_size
from slimlm.formats import IntScheme, PerGroup, fake_quantize, parse_scheme
from slimlm.models.tiny import tiny_model
from slimlm.nn import QuantLinear
from slimlm.quant.mixed import allocate, average_bpw, hessian_error, min_bpw, sensitivities, total_error
from slimlm.quant.mixed_handler import MixedPrecision, apply_mixed, fisher_diagonal, mixed_allocation, summarize
from slimlm.targets import Targets

def apply(model, config, calib):
    """Like slimlm.api.apply (handlers run under no_grad), without needing the registry entry."""
    with torch.no_grad():
        return apply_mixed(model, config, calib)


CALIB = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
CANDIDATES = ("int2-g32", "int3-g32", "int4-g32", "int8-channel-sym")


def _problem(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    bpw = torch.tensor([2.5, 3.5, 4.5, 8.25]).repeat(L, 1)
    n = torch.randint(1, 10, (L,), generator=g).double() * 4096
    scale = torch.rand(L, 1, generator=g).double() * 10
    errors = scale * torch.tensor([16.0, 4.0, 1.0, 0.004]).double() * (0.5 + torch.rand(L, 4, generator=g).double())
    return errors, bpw.double(), n


def test_allocation_never_exceeds_the_budget_and_comes_close():
    errors, bpw, n = _problem(60)
    for budget in (2.5, 2.8, 3.0, 3.5, 4.0, 4.25, 5.0, 7.0, 8.25, 9.0):
        choice = allocate(errors, bpw, n, budget, resolution=4096)
        got = average_bpw(choice, bpw, n)
        assert got <= budget + 1e-12
        # the smallest layer upgrade step bounds how much budget may remain unused
        assert got >= min(budget, 8.25) - 4096 * 9 * 3.75 / n.sum()


def test_allocation_is_optimal_against_brute_force():
    errors, bpw, n = _problem(6, seed=1)
    errors, bpw = errors[:, :3], bpw[:, :3]
    combos = torch.tensor(list(itertools.product(range(3), repeat=6)))  # (729, 6)
    rows = torch.arange(6)
    combo_err = errors[rows, combos].sum(1)  # (729,)
    combo_bpw = (bpw[rows, combos] * n).sum(1) / n.sum()
    for budget in (2.5, 2.9, 3.2, 3.5, 3.8, 4.1, 4.5):
        best = combo_err[combo_bpw <= budget + 1e-12].min()
        choice = allocate(errors, bpw, n, budget)
        assert average_bpw(choice, bpw, n) <= budget
        assert total_error(choice, errors) <= float(best) * (1 + 1e-9)


def test_more_budget_never_increases_total_error():
    errors, bpw, n = _problem(40, seed=2)
    budgets = torch.linspace(2.5, 8.5, 25).tolist()
    totals = [total_error(allocate(errors, bpw, n, b, resolution=4096), errors) for b in budgets]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(totals, totals[1:]))
    assert totals[-1] < totals[0]


def test_budget_below_the_cheapest_allocation_is_refused():
    errors, bpw, n = _problem(4)
    assert min_bpw(bpw, n) == pytest.approx(2.5)
    with pytest.raises(SlimlmError, match="below the cheapest allocation 2.5000"):
        allocate(errors, bpw, n, 2.0)


def test_hessian_error_is_the_layer_output_error():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(200, 64, generator=g), torch.randn(32, 64, generator=g)
    H = 2.0 / 200 * X.t() @ X
    Wq = fake_quantize(W, parse_scheme("int3-g32"))
    expected = 2.0 / 200 * (X @ (W - Wq).t()).square().sum()
    assert hessian_error(W, Wq, H) == pytest.approx(float(expected), rel=1e-4)
    errs = sensitivities(W, H, [parse_scheme(s) for s in CANDIDATES])
    assert (errs[:-1] > errs[1:]).all()  # more bits, less output error


def test_handler_meets_the_budget_from_real_buffers_and_mixes_schemes():
    model = tiny_model("llama")
    apply(model, MixedPrecision(budget_bpw=3.5, candidates=CANDIDATES), CALIB)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    bpw = measure_size(model).bits_per_weight
    assert 3.4 <= bpw <= 3.5
    assert len({m.scheme for m in layers}) >= 2
    assert model(CALIB[:2]).logits.shape == (2, 32, 512)


def test_allocation_extremes_and_beats_uniform_at_equal_size():
    model = tiny_model("llama")
    # in_features 64 with groups of 32: int2/int3/int4-g32 store 3.0/4.0/5.0 bits per weight
    low = mixed_allocation(model, MixedPrecision(budget_bpw=3.0, candidates=CANDIDATES), CALIB)
    assert set(low.schemes.values()) == {IntScheme(2, granularity=PerGroup(32))}
    high = mixed_allocation(model, MixedPrecision(budget_bpw=9.0, candidates=CANDIDATES), CALIB)
    assert {s.bits for s in high.schemes.values()} == {8}
    mid = mixed_allocation(model, MixedPrecision(budget_bpw=4.0, candidates=CANDIDATES), CALIB)
    uniform_int3 = sum(float(e[1]) for e in mid.errors.values())  # int3-g32 is exactly 4.0 bpw
    assert mid.total_error <= uniform_int3 * (1 + 1e-9)
    assert set(summarize(mid)) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # allocation alone changes nothing


def test_mixed_beats_rtn_int3_on_layer_output_error():
    """Summed Hessian-weighted error of the layers on float block inputs, vs RTN int3 at the same 4.0 bpw."""
    model = tiny_model("llama")
    alloc = mixed_allocation(model, MixedPrecision(budget_bpw=4.0, candidates=CANDIDATES, normalize=False, sensitivity="hessian"), CALIB)
    int3 = parse_scheme("int3-g32")
    err_mixed = err_rtn = 0.0

    def on_block(ctx):
        nonlocal err_mixed, err_rtn
        for name, lin in ctx.linears.items():
            W, H = lin.weight.detach(), ctx.stats[name].H
            err_mixed += hessian_error(W, fake_quantize(W, alloc.schemes[name]), H)
            err_rtn += hessian_error(W, fake_quantize(W, int3), H)
        return False

    calibrate_blocks(model, CALIB, on_block=on_block, spec=StatsSpec(hessian=True))
    assert err_mixed < err_rtn


def test_refusals():
    with pytest.raises(SlimlmError, match="calibration token ids"):
        apply_mixed(tiny_model("llama"), MixedPrecision(), None)
    with pytest.raises(SlimlmError, match="budget_bpw must be a positive"):
        MixedPrecision(budget_bpw=0)
    with pytest.raises(SlimlmError, match="unknown quantization scheme"):
        MixedPrecision(candidates=("int4-g64", "fp5"))
    with pytest.raises(SlimlmError, match="lm_head"):
        MixedPrecision(targets=Targets(lm_head=True))
    with pytest.raises(SlimlmError, match="below 3.0000"):
        mixed_allocation(tiny_model("llama"), MixedPrecision(budget_bpw=2.0, candidates=CANDIDATES), CALIB)
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match="does not divide in_features 64"):
        apply_mixed(model, MixedPrecision(candidates=("int4-g48",)), CALIB)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def _loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_fisher_diagonal_is_the_sum_of_squared_per_sequence_gradients():
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    F = fisher_diagonal(model, CALIB[:3], {name: lin})[name]
    expected = torch.zeros_like(lin.weight)
    for ids in CALIB[:3]:
        model.zero_grad()
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        expected += lin.weight.grad.square()
    model.zero_grad()
    assert torch.allclose(F, expected, rtol=1e-5, atol=1e-12)
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())


def test_fisher_allocation_beats_uniform_int3_on_the_model_loss():
    """End-to-end: at int3-g32's 4.0 bpw, the Fisher allocation hurts the LM loss less than uniform int3."""
    base = tiny_model("llama")
    held_out = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    mixed, uniform = tiny_model("llama"), tiny_model("llama")
    cands = ("int2-g32", "int3-g32", "int4-g32")
    apply(mixed, MixedPrecision(budget_bpw=4.0, candidates=cands, fisher_samples=8), CALIB)
    apply(uniform, MixedPrecision(budget_bpw=4.0, candidates=("int3-g32",)), CALIB)
    assert measure_size(mixed).bits_per_weight <= measure_size(uniform).bits_per_weight + 1e-9
    assert len({m.scheme for m in mixed.modules() if isinstance(m, QuantLinear)}) >= 2
    base_loss = _loss(base, held_out)
    assert _loss(mixed, held_out) - base_loss < _loss(uniform, held_out) - base_loss


def test_candidates_that_do_not_fit_a_layer_are_skipped_there():
    model = tiny_model("llama")  # hidden 64, intermediate 128: only down_proj has 128 inputs
    alloc = mixed_allocation(model, MixedPrecision(budget_bpw=9.0, candidates=("int4-g32", "int8-g128")), CALIB)
    for name, scheme in alloc.schemes.items():
        assert scheme.bits == (8 if name.endswith("down_proj") else 4), name
    assert torch.isinf(alloc.errors["model.layers.0.self_attn.q_proj"][1])


def test_sensitivity_refusals():
    with pytest.raises(SlimlmError, match="sensitivity must be one of fisher, hessian"):
        MixedPrecision(sensitivity="kl")
    with pytest.raises(SlimlmError, match="fisher_samples must be an int >= 1"):
        MixedPrecision(fisher_samples=0)


def test_gptq_quantizer_keeps_the_allocation_and_beats_rounding():
    """quantizer: gptq quantizes every linear at the scheme the allocation chose, with less damage."""
    cfg = dict(budget_bpw=4.0, candidates=("int2-g32", "int3-g32", "int4-g32"), fisher_samples=8)
    alloc = mixed_allocation(tiny_model("llama"), MixedPrecision(**cfg), CALIB)
    base, rtn, gptq = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    apply(rtn, MixedPrecision(**cfg), CALIB)
    apply(gptq, MixedPrecision(**cfg, quantizer="gptq"), CALIB)
    got = {n: m.scheme for n, m in gptq.named_modules() if isinstance(m, QuantLinear)}
    assert got == alloc.schemes
    assert measure_size(gptq).bits_per_weight == measure_size(rtn).bits_per_weight
    held_out = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # damage = logit error on held-out tokens (the random model's loss barely moves)
        want = base(held_out).logits
        damage = {k: (m(held_out).logits - want).pow(2).mean().item() for k, m in (("rtn", rtn), ("gptq", gptq))}
    assert damage["gptq"] < 0.95 * damage["rtn"], damage


def test_quantizer_refusals():
    with pytest.raises(SlimlmError, match="quantizer must be one of rtn, gptq"):
        MixedPrecision(quantizer="awq")
    with pytest.raises(SlimlmError, match="GPTQ quantizes to IntScheme"):
        MixedPrecision(candidates=("nf4", "int4-g32"), quantizer="gptq")
