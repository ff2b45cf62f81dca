import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.solvers.lowrank import cholesky_whitening, lowrank_factors, scale_whitening, spectrum


def _problem(n_in=40, n_out=24, rows=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n_in, generator=g, dtype=torch.float64) @ torch.randn(n_in, n_in, generator=g,
                                                                              dtype=torch.float64)
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    return W, X


def _out_err(W, Wp, X):
    return ((W - Wp) @ X.t()).square().sum().item()


def test_plain_svd_is_eckart_young_and_full_rank_is_exact():
    W, _ = _problem()
    A, B = lowrank_factors(W, 5)
    assert A.shape == (5, 40) and B.shape == (24, 5)
    s = torch.linalg.svdvals(W)
    torch.testing.assert_close((W - B @ A).square().sum(), s[5:].square().sum())
    A, B = lowrank_factors(W, 24)
    torch.testing.assert_close(B @ A, W)


def test_whitened_truncation_minimises_output_error_and_costs_the_dropped_energy():
    W, X = _problem()
    H = X.t() @ X
    sp = spectrum(W, cholesky_whitening(H, damp=0.0))
    A, B = sp.factors(6, dtype=torch.float64)
    err = _out_err(W, B @ A, X)
    # the cost of truncation is exactly the dropped singular values' energy (SVD-LLM's theorem)
    torch.testing.assert_close(err, sp.s[6:].square().sum().item(), rtol=1e-6, atol=0)
    # and beats plain SVD and random perturbations of the optimum on the output error
    Ap, Bp = lowrank_factors(W, 6)
    assert err < 0.9 * _out_err(W, Bp @ Ap, X)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        dA = 1e-3 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        assert err < _out_err(W, B @ (A + dA), X)
    assert sp.dropped_energy(24) == 0.0
    e = sp.s.square()
    torch.testing.assert_close(sp.dropped_energy(6), (e[6:].sum() / e.sum()).item())


def test_diagonal_whitening_matches_the_dense_form():
    W, X = _problem()
    a = X.abs().mean(0).sqrt()
    Ad, Bd = lowrank_factors(W, 7, scale_whitening(a))
    S = torch.diag(a)
    U, s, Vh = torch.linalg.svd(W @ S)
    torch.testing.assert_close(Bd @ Ad, (U[:, :7] * s[:7]) @ Vh[:7] @ torch.linalg.inv(S))


def test_singular_gram_is_dampened_and_bad_input_refused():
    W, X = _problem()
    X[:, 3] = 0  # a dead input
    wh = cholesky_whitening(X.t() @ X, damp=0.0)
    A, B = lowrank_factors(W, 4, wh)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    with pytest.raises(SlimlmError, match="rank must be in 1..24"):
        lowrank_factors(W, 0)
    with pytest.raises(SlimlmError, match="rank must be in 1..24"):
        lowrank_factors(W, 25)
    with pytest.raises(SlimlmError, match="square"):
        cholesky_whitening(torch.ones(3, 4))
    with pytest.raises(SlimlmError, match="non-negative"):
        scale_whitening(torch.tensor([1.0, -1.0]))
    with pytest.raises(SlimlmError, match="singular"):
        cholesky_whitening(torch.full((3, 3), float("nan")))
