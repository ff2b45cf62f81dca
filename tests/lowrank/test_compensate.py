"""EoRA's maths on one layer, and the step on a tiny model: full rank gives the float layer back,
whitening beats the plain SVD of the residual on correlated inputs, and the recipe step reads the
model as it was before the recipe."""

import pytest
import torch
from torch import nn

from slimlm.api import apply, apply_all
from slimlm.formats import IntScheme, PerGroup
from slimlm.io import load_compressed, save_compressed
from slimlm.lowrank import EoRA, compensation, output_error
from slimlm.models.size import measure_size
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import CompensatedLinear, QuantLinear
from slimlm.quant import RTN
from slimlm.quant.gptq_handler import GPTQ
from slimlm.recipe import load_recipe
from slimlm.targets import candidate_linears

CALIB = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
IDS = torch.arange(3, 35).reshape(1, 32)
INT3 = IntScheme(3, granularity=PerGroup(32))


def _layer(n_in=64, n_out=48, rows=2000, seed=0):
    """A linear, its int3 QuantLinear, and strongly correlated inputs X (rows, in) with Gram H."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
    mix = torch.randn(n_in, n_in, generator=g) * torch.logspace(0, -2, n_in)[:, None]  # a few directions dominate
    X = torch.randn(rows, n_in, generator=g) @ mix
    return lin, QuantLinear.from_linear(lin, INT3), X, X.double().t() @ X.double()


def test_full_rank_whitened_side_path_gives_the_float_layer_back():
    lin, q, X, H = _layer()
    A, B, dropped = compensation(lin.weight, q.dequantized_weight(), H, 48)
    assert dropped == pytest.approx(0.0, abs=1e-12)
    c = CompensatedLinear(q, A, B)
    with torch.no_grad():
        torch.testing.assert_close(c(X), lin(X), rtol=1e-4, atol=1e-4)
        assert (c(X) - lin(X)).abs().max() < 1e-2 * (q(X) - lin(X)).abs().max()


def test_whitening_beats_the_plain_svd_of_the_residual_on_correlated_inputs():
    lin, q, X, H = _layer()
    W, W_hat = lin.weight.detach(), q.dequantized_weight()
    E = W - W_hat
    none = output_error(E, H)
    A, B, dropped = compensation(W, W_hat, H, 8, damp=0.0)
    white = output_error(E - B @ A, H)
    Ap, Bp, _ = compensation(W, W_hat, None, 8)
    plain = output_error(E - Bp @ Ap, H)
    assert white < 0.8 * plain < 0.8 * none
    # the output error left is exactly the dropped whitened energy (float32 factors: loose)
    assert white == pytest.approx(dropped * none, rel=1e-3)
    # the layer's outputs say the same as the traces
    with torch.no_grad():
        err = (CompensatedLinear(q, A, B)(X) - lin(X)).double().square().sum().item()
    assert err == pytest.approx(white, rel=1e-3)


def _kl(model, ref):
    with torch.no_grad():
        logp = model(IDS).logits.log_softmax(-1)
    return torch.nn.functional.kl_div(logp, ref.log_softmax(-1), log_target=True, reduction="batchmean").item()


def test_recipe_step_reads_the_pre_recipe_model_and_improves_the_logits(tmp_path):
    base = tiny_model("llama")
    with torch.no_grad():
        ref = base(IDS).logits
    gptq = tiny_model("llama")
    apply_all(gptq, load_recipe("gptq-int3-g64").steps, CALIB)
    comp = tiny_model("llama")
    apply_all(comp, load_recipe("gptq-int3-g64-eora32").steps, CALIB)
    assert all(isinstance(m, CompensatedLinear) and m.rank == 32 and m.A.dtype == m.B.dtype == torch.float16
               for m in candidate_linears(comp).values())  # fmt: skip
    kl_gptq, kl_comp = _kl(gptq, ref), _kl(comp, ref)
    assert kl_comp < 0.5 * kl_gptq
    loaded, _ = load_compressed(save_compressed(comp, tiny_tokenizer(), tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, comp(IDS).logits)
    # float16 factors stay float16 through the checkpoint, and are counted as such
    assert all(m.A.dtype == torch.float16 for m in candidate_linears(loaded).values())
    side = sum(2 * 32 * (m.in_features + m.out_features) for m in candidate_linears(loaded).values())
    assert measure_size(loaded).linear_bytes - measure_size(gptq).linear_bytes == side


def test_python_api_and_per_layer_ranks_and_plain_mode():
    base = tiny_model("llama")
    q = tiny_model("llama")
    apply(q, RTN(scheme=INT3))
    apply(q, EoRA(rank=4, overrides=(("*.down_proj", 16),), whiten=False), original=base)  # no calib needed
    ranks = {n.rsplit(".", 1)[-1]: m.rank for n, m in candidate_linears(q).items()}
    assert ranks["down_proj"] == 16 and ranks["q_proj"] == 4
    # the plain side path is the truncated SVD of W - W_hat, layer by layer
    name = "model.layers.0.mlp.down_proj"
    m = q.get_submodule(name)
    E = base.get_submodule(name).weight.detach().double() - m.base.dequantized_weight().double()
    s = torch.linalg.svdvals(E)
    left = (E - m.side_weight().double()).square().sum()
    torch.testing.assert_close(left, s[16:].square().sum(), rtol=1e-4, atol=0)


def test_compensation_after_gptq_on_a_model_with_biases_and_conv1d():
    for family in ("qwen2", "gpt2"):
        model = tiny_model(family)
        with torch.no_grad():
            ref = model(IDS).logits
        gptq = tiny_model(family)
        apply_all(gptq, [GPTQ(scheme=INT3)], CALIB)
        apply_all(model, [GPTQ(scheme=INT3), EoRA(rank=32)], CALIB)
        assert _kl(model, ref) < _kl(gptq, ref)
