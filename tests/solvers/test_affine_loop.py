"""The inlined affine column loop gives the generic OBS loop's codes, weight and losses bit for bit."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme
from slimlm.formats.affine import affine_qrange
from slimlm.solvers import column_grid, grid_solve, obs_solve, prepare
from slimlm.solvers.affine_loop import obs_solve_affine


def _problem(n_out, n_in, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(600, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    X[:, :3] *= 8  # loud channels, as in LLM activations
    return torch.randn(n_out, n_in, generator=g) * 0.1, 2 * X.t() @ X / 600


SCHEMES = ["int4-g16", "int3-channel", "int4-g16-sym", "int8-tensor", "int2-g32", "int4-g16-clip"]


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_same_codes_weight_and_losses_as_the_generic_loop(spec, act_order):
    scheme = parse_scheme(spec)
    W, H = _problem(24, 96, seed=len(spec))
    prob = prepare(W, H, percdamp=0.01, act_order=act_order)
    Wp = prob.W[:, prob.perm]  # solve order
    slow = column_grid(prob.W, scheme, prob.perm)
    Q_ref, losses_ref = obs_solve(Wp, prob.Hinv, slow, on_block=slow.on_block, blocksize=40)
    fast = column_grid(prob.W, scheme, prob.perm)
    scale, zero = fast.solve_order_params()
    qmin, qmax = affine_qrange(scheme.bits, scheme.symmetric)
    codes, Q, losses = obs_solve_affine(Wp, prob.Hinv, scale, zero, qmin=qmin, qmax=qmax, blocksize=40)
    assert torch.equal(Q, Q_ref) and torch.equal(losses, losses_ref)
    assert torch.equal(codes[:, torch.argsort(prob.perm)].to(slow.codes.dtype), slow.codes)
    assert torch.equal(grid_solve(fast, Wp, prob.Hinv, blocksize=40), losses_ref)  # the dispatcher
    assert torch.equal(fast.codes, slow.codes)


def test_rows_solve_independently():
    """Stacking linears that share a Hessian (q, k, v) gives each one's own codes: the loop is row-wise."""
    scheme = parse_scheme("int4-g16")
    W, H = _problem(40, 64, seed=1)
    prob = prepare(W, H, percdamp=0.01, act_order=True)

    def codes(rows):
        grid = column_grid(prob.W[rows], scheme, prob.perm)
        grid_solve(grid, prob.W[rows][:, prob.perm], prob.Hinv, blocksize=16)
        return grid.codes

    assert torch.equal(torch.cat([codes(slice(0, 24)), codes(slice(24, 40))]), codes(slice(0, 40)))


def test_dynamic_groups_keep_the_generic_loop():
    W, H = _problem(8, 64, seed=2)
    prob = prepare(W, H, percdamp=0.01, act_order=True)
    assert column_grid(prob.W, parse_scheme("int4-g16"), prob.perm, static_groups=False).solve_order_params() is None
    with pytest.raises(SlimlmError, match="scale"):
        obs_solve_affine(W, prob.Hinv, torch.ones(8, 32), None, qmin=-7, qmax=7)
