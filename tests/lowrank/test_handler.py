"""SVD / ASVD / SVD-LLM handlers on tiny models: budgets, quality ordering, refusals, recipes."""

import pytest
import torch

from slimlm.api import apply, needs_calibration
from slimlm.errors import SlimlmError
from slimlm.lowrank import ASVD, SVD, SVDLLM
from slimlm.lowrank.ranks import kept_params, uniform_rank
from slimlm.models.tiny import tiny_model
from slimlm.nn import LowRankLinear, QuantLinear
from slimlm.pipelines.lazy import check_lazy
from slimlm.quant import RTN
from slimlm.recipe import config_from_dict
from slimlm.solvers.lowrank import cholesky_whitening, lowrank_factors, scale_whitening, spectrum
from slimlm.targets import Targets

CALIB = torch.randint(3, 512, (8, 96), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def _factorized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _kld(model, base) -> float:
    with torch.no_grad():
        p, q = base(TEST).logits.log_softmax(-1), model(TEST).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _q_input(model):
    """q_proj's calibration input in block 0 (identical for every method: nothing before it changes)."""
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(CALIB)
    hook.remove()
    return torch.cat(seen).reshape(-1, 64).double()  # (tokens, in)


@pytest.mark.parametrize("params", [0.2, 0.4])
def test_uniform_budget_per_layer_within_one_rank_step(params):
    model = tiny_model("llama")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.startswith("model.layers")
              and isinstance(m, torch.nn.Linear)}  # fmt: skip
    apply(model, SVD(params=params))
    done = _factorized(model)
    assert set(done) == set(shapes)
    for name, m in done.items():
        assert m.rank == uniform_rank(shapes[name], params)
        m_, n_ = shapes[name]
        assert kept_params(shapes[name], m.rank) <= (1 - params) * m_ * n_ < kept_params(shapes[name], m.rank + 1)


def test_svd_layer_is_the_truncated_svd():
    model, base = tiny_model("llama"), tiny_model("llama")
    apply(model, SVD(rank=5))
    W = base.model.layers[1].mlp.down_proj.weight.detach()
    lr = model.model.layers[1].mlp.down_proj
    A, B = lowrank_factors(W, 5)
    torch.testing.assert_close(lr.dequantized_weight(), B @ A)


def test_svd_llm_beats_svd_and_asvd_on_output_error_and_kld():
    base = tiny_model("llama")
    X = _q_input(base)
    W = base.model.layers[0].self_attn.q_proj.weight.detach().double()
    errs, klds = {}, {}
    for cfg in (SVD(params=0.3), ASVD(params=0.3), SVDLLM(params=0.3)):
        model = tiny_model("llama")
        apply(model, cfg, CALIB)
        Wq = model.model.layers[0].self_attn.q_proj.dequantized_weight().double()
        errs[type(cfg).__name__] = float(((W - Wq) @ X.t()).square().sum())
        klds[type(cfg).__name__] = _kld(model, base)
    assert errs["SVDLLM"] < 0.9 * errs["SVD"] and errs["SVDLLM"] < 0.95 * errs["ASVD"]
    assert klds["SVDLLM"] < 0.8 * klds["SVD"]


def test_svd_llm_costs_its_dropped_energy_on_the_first_layer():
    base, model = tiny_model("llama"), tiny_model("llama")
    X = _q_input(base)
    W = base.model.layers[0].self_attn.q_proj.weight.detach()
    apply(model, SVDLLM(rank=6, damp=0.0), CALIB)
    sp = spectrum(W.double(), cholesky_whitening(X.t() @ X, damp=0.0))
    Wq = model.model.layers[0].self_attn.q_proj.dequantized_weight().double()
    err = float(((W.double() - Wq) @ X.t()).square().sum())
    assert err == pytest.approx(float(sp.s[6:].square().sum()), rel=1e-3)


def test_asvd_scales_inputs_by_rms_to_the_alpha():
    base, model = tiny_model("llama"), tiny_model("llama")
    X = _q_input(base)
    apply(model, ASVD(rank=6, alpha=0.7), CALIB)
    W = base.model.layers[0].self_attn.q_proj.weight.detach()
    rms = X.square().mean(0).sqrt()
    A, B = lowrank_factors(W.double(), 6, scale_whitening(rms**0.7))
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.dequantized_weight().double(), B @ A,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("cfg", [SVD(params=0.3, allocation="spectrum"), SVDLLM(params=0.3, allocation="spectrum")])
def test_spectrum_allocation_meets_the_budget_with_ranks_that_differ(cfg):
    model = tiny_model("llama")
    dense = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers")
                and isinstance(m, torch.nn.Linear))  # fmt: skip
    apply(model, cfg, CALIB)
    kept = sum(m.weight.numel() if isinstance(m, torch.nn.Linear) else m.rank * (m.in_features + m.out_features)
               for n, m in model.named_modules() if n.startswith("model.layers") and n.count(".") == 4
               and isinstance(m, (torch.nn.Linear, LowRankLinear)))  # fmt: skip
    assert 0.7 * dense - (64 + 128) < kept <= 0.7 * dense
    fractions = {m.rank / min(m.in_features, m.out_features) for m in _factorized(model).values()}
    assert len(fractions) > 1


def test_energy_keeps_the_smallest_rank_reaching_the_share():
    base, model = tiny_model("llama"), tiny_model("llama")
    apply(model, SVD(energy=0.8))
    for name, m in _factorized(model).items():
        sp = spectrum(base.get_submodule(name).weight.detach())
        assert sp.dropped_energy(m.rank) <= 0.2 + 1e-9 < sp.dropped_energy(m.rank - 1)


def test_lm_head_can_be_factorized_with_calibration():
    model = tiny_model("mistral")  # untied lm_head
    apply(model, SVDLLM(rank=8, targets=Targets(include=("lm_head",), lm_head=True)), CALIB)
    assert set(_factorized(model)) == {"lm_head"}


def test_recipe_steps_and_calibration_needs():
    cfg = config_from_dict({"method": "svd_llm", "params": 0.4, "allocation": "spectrum", "exclude": ["*.k_proj"]})
    assert cfg == SVDLLM(params=0.4, allocation="spectrum", targets=Targets(exclude=("*.k_proj",)))
    assert config_from_dict({"asvd": {"alpha": 0.5}}) == ASVD(alpha=0.5, params=0.2)
    assert not needs_calibration([SVD()]) and needs_calibration([ASVD()]) and needs_calibration([SVDLLM()])
    with pytest.raises(SlimlmError, match="unknown key.*damp"):
        config_from_dict({"method": "svd", "damp": 0.1})


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(params=0.0), "params must be a number strictly between 0 and 1"),
    (dict(params=1.0), "1 would remove everything"),
    (dict(params=0.2, energy=0.9), "one budget of params, energy or rank, not params and energy"),
    (dict(energy=1.5), "energy must be a number strictly between 0 and 1"),
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-3), "rank must be a positive int"),
    (dict(allocation="greedy"), "allocation must be one of uniform, spectrum"),
    (dict(energy=0.9, allocation="spectrum"), "allocation: spectrum spends a params budget"),
    (dict(targets="*.q_proj"), "targets must be a Targets"),
])  # fmt: skip
def test_config_refusals(kwargs, pattern):
    with pytest.raises(SlimlmError, match=pattern) as e:
        SVD(**kwargs)
    assert "\n" not in str(e.value)


def test_method_specific_refusals():
    with pytest.raises(SlimlmError, match="alpha must be"):
        ASVD(alpha=0.0)
    with pytest.raises(SlimlmError, match="damp must be"):
        SVDLLM(damp=-1.0)
    with pytest.raises(SlimlmError, match="batch_size must be"):
        SVDLLM(batch_size=0)


@pytest.mark.parametrize("cfg,pattern", [
    (SVD(rank=33), r"rank 33 exceeds min\(in, out\) = 32 of model.layers.0.self_attn.k_proj \(32x64\); give rank "
                   "<= 32"),
    (SVD(params=0.99), r"params 0.99 removes everything from .* \(64x64: rank 0\); the largest params that "
                       r"keeps rank 1 in every target is 0.9531"),
    (SVD(params=0.99, allocation="spectrum"), "params 0.99 removes everything"),
    (SVD(targets=Targets(include=("*.nothing",))), "select no linear"),
    (SVDLLM(), "SVDLLM needs calibration token ids"),
])  # fmt: skip
def test_apply_refusals_change_nothing(cfg, pattern):
    model, base = tiny_model("llama"), tiny_model("llama")
    with pytest.raises(SlimlmError, match=pattern) as e:
        apply(model, cfg)
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert not _factorized(model)


def test_already_compressed_layers_are_refused_both_ways():
    model = tiny_model("llama")
    apply(model, RTN())
    with pytest.raises(SlimlmError, match="already a QuantLinear; factorize float linears"):
        apply(model, SVD())
    model = tiny_model("llama")
    apply(model, SVD())
    with pytest.raises(SlimlmError, match="is a LowRankLinear \\(already compressed"):
        apply(model, RTN())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_bfloat16_model_gets_bfloat16_factors():
    model = tiny_model("llama").to(torch.bfloat16)
    apply(model, SVDLLM(params=0.2), CALIB)
    m = model.model.layers[0].mlp.up_proj
    assert m.A.dtype == m.B.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(TEST).logits.isfinite().all()


@pytest.mark.parametrize("cfg", [SVD(allocation="spectrum"), SVDLLM(allocation="spectrum")])
def test_lazy_refusal_is_one_line(cfg):
    with pytest.raises(SlimlmError, match="allocation: spectrum.*run it without --lazy") as e:
        check_lazy([cfg])
    assert "\n" not in str(e.value)
