"""SVD-LLM's closed-form update of the output factor (``update: true``): exact least squares given A."""

import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.lowrank import SVDLLM
from slimlm.lowrank.svd_llm import closed_form_update
from slimlm.models.tiny import tiny_model
from slimlm.recipe import config_from_dict
from slimlm.solvers.lowrank import cholesky_whitening, spectrum

CALIB = torch.randint(3, 512, (8, 96), generator=torch.Generator().manual_seed(0))
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _problem(seed=0, n=400, d_in=48, d_out=32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in).double()
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix  # (n, in): correlated, ill-conditioned
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return W, X, X.T @ X


def _err(W, B, A, X) -> float:
    return float(((W - B @ A) @ X.T).norm())


def test_update_is_the_least_squares_output_factor_and_beats_a_dampened_truncation():
    W, X, G = _problem()
    A, B = spectrum(W, cholesky_whitening(G, damp=0.1)).factors(8, dtype=torch.float64)
    B2 = closed_form_update(W, A, G)
    assert torch.allclose((B2 @ A - W) @ G @ A.T, torch.zeros(32, 8, dtype=torch.float64), atol=1e-6 * G.norm())
    assert _err(W, B2, A, X) < 0.999 * _err(W, B, A, X)
    for trial in range(5):  # no other B does better for this A
        other = B2 + 1e-3 * torch.randn(B2.shape, generator=torch.Generator().manual_seed(trial), dtype=B2.dtype)
        assert _err(W, other, A, X) > _err(W, B2, A, X)


def test_update_returns_the_truncations_factor_when_the_whitening_used_the_same_gram():
    W, X, G = _problem(seed=1)
    A, B = spectrum(W, cholesky_whitening(G, damp=0.0)).factors(8, dtype=torch.float64)
    torch.testing.assert_close(closed_form_update(W, A, G), B, rtol=1e-6, atol=1e-8)


def _block0_errors(model, base):
    """Relative output error of block 0's linears on the calibration inputs (the same for every run:
    nothing before block 0 changes)."""
    errs = {}
    for rel in LINEARS:
        seen = []
        hook = base.model.layers[0].get_submodule(rel).register_forward_hook(lambda m, a, o: seen.append(a[0]))
        with torch.no_grad():
            base(CALIB)
        hook.remove()
        X = torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()  # (tokens, in)
        W = base.model.layers[0].get_submodule(rel).weight.detach().double()
        lr = model.model.layers[0].get_submodule(rel)
        errs[rel] = _err(W, lr.B.detach().double(), lr.A.detach().double(), X) / float((W @ X.T).norm())
    return errs


def test_update_on_a_tiny_model_never_raises_the_calibration_error_and_keeps_a():
    base = tiny_model("llama")
    plain, updated = tiny_model("llama"), tiny_model("llama")
    apply(plain, SVDLLM(params=0.4, damp=0.1), CALIB)
    apply(updated, SVDLLM(params=0.4, damp=0.1, update=True), CALIB)
    before, after = _block0_errors(plain, base), _block0_errors(updated, base)
    assert all(after[k] <= before[k] * (1 + 1e-6) for k in LINEARS), (before, after)
    assert sum(after.values()) < sum(before.values()) - 1e-3, (before, after)
    for rel in LINEARS:  # only B moved
        assert torch.equal(plain.model.layers[0].get_submodule(rel).A, updated.model.layers[0].get_submodule(rel).A)
        assert not torch.equal(plain.model.layers[0].get_submodule(rel).B, updated.model.layers[0].get_submodule(rel).B)


def test_update_is_a_recipe_key_and_must_be_a_bool():
    assert config_from_dict({"method": "svd_llm", "update": True}).update is True
    assert SVDLLM().update is False
    with pytest.raises(SlimlmError, match="update must be true or false"):
        SVDLLM(update="yes")
