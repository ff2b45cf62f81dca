import torch

from slimlm.formats import IntScheme, PerGroup
from slimlm.quant.gptq import gptq_quantize
from slimlm.solvers import LazyBlock, dampen_and_invert, obs_solve, prepare, solve_with_mask


def _problem(n_in=48, n_out=12, rows=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)  # correlated inputs
    W = torch.randn(n_out, n_in, generator=g)
    return W, 2 * X.t() @ X / rows


def _round_half(j, w):
    return torch.round(w * 2) / 2


def test_diagonal_hessian_is_plain_rounding():
    W, _ = _problem()
    H = torch.diag(torch.rand(W.shape[1]) + 0.5)
    U, _ = dampen_and_invert(H, 0.01)
    Q, losses = obs_solve(W, U, _round_half, blocksize=16)
    assert torch.equal(Q, torch.round(W * 2) / 2)
    d = U.diagonal()
    torch.testing.assert_close(losses, ((W - Q) ** 2).sum(0) / d**2 / 2)


def test_losses_sum_to_the_layer_error_and_lazy_blocks_change_nothing():
    W, H = _problem()
    U, damp = dampen_and_invert(H, 0.0)
    assert damp == 0.0
    Q, losses = obs_solve(W, U, _round_half, blocksize=48)
    err = 0.5 * torch.einsum("oi,ij,oj->", W - Q, H, W - Q)  # 1/2 tr(dW H dW^T)
    torch.testing.assert_close(losses.sum(), err, rtol=1e-3, atol=1e-4)
    for bs in (1, 7, 16):
        Qb, lb = obs_solve(W, U, _round_half, blocksize=bs)
        torch.testing.assert_close(Qb, Q, rtol=0, atol=1e-5)
        torch.testing.assert_close(lb, losses, rtol=1e-4, atol=1e-5)


def test_solver_beats_rounding_on_the_layer_output():
    W, H = _problem()
    U, _ = dampen_and_invert(H, 0.01)
    Q, _ = obs_solve(W, U, _round_half)
    R = torch.round(W * 2) / 2

    def err(Wq):
        return torch.einsum("oi,ij,oj->", W - Wq, H, W - Wq)

    assert err(Q) < 0.7 * err(R)


def test_block_hook_sees_live_blocks_and_current_adds_pending_updates():
    W, H = _problem(n_in=40)
    U, _ = dampen_and_invert(H, 0.01)
    starts, seen = [], {}
    blocks: list[LazyBlock] = []

    def on_block(b):
        starts.append((b.i1, b.i2, tuple(b.W1.shape), tuple(b.Hinv1.shape)))
        blocks.append(b)

    def column(j, w):
        if j == 13:  # mid-block: every later column's current value, in and after the block
            seen["lazy"] = blocks[-1].current(torch.arange(13, 40))
        return _round_half(j, w)

    obs_solve(W, U, column, on_block=on_block, blocksize=16)
    assert starts == [(0, 16, (12, 16), (16, 16)), (16, 32, (12, 16), (16, 16)), (32, 40, (12, 8), (8, 8))]

    def column_eager(j, w):
        if j == 13:
            seen["eager"] = blocks[-1].current(torch.arange(13, 40))
        return _round_half(j, w)

    obs_solve(W, U, column_eager, on_block=blocks.append, blocksize=40)  # one block: nothing pending
    torch.testing.assert_close(seen["lazy"], seen["eager"], rtol=1e-4, atol=1e-4)


def test_column_callback_can_prune():
    """SparseGPT's use: a callback that zeroes entries; the solver compensates on later columns."""
    W, H = _problem()
    U, _ = dampen_and_invert(H, 0.01)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    Q, _ = obs_solve(W, U, lambda j, w: w * keep[:, j])
    assert not (Q[~keep] != 0).any()  # pruned entries stay exactly zero

    def err(Wq):
        return torch.einsum("oi,ij,oj->", W - Wq, H, W - Wq)

    assert err(Q) < err(W * keep)


def test_singular_hessian_gets_more_dampening():
    H = torch.zeros(8, 8)
    H[0, 0] = 1.0  # rank 1, and percdamp 0
    U, damp = dampen_and_invert(H, 0.0)
    assert damp > 0 and torch.isfinite(U).all()


def test_prepare_zeroes_dead_inputs_and_orders_by_activity():
    W, H = _problem(n_in=16)
    H[3, :], H[:, 3] = 0.0, 0.0  # input 3 is always 0
    prob = prepare(W, H, percdamp=0.01, act_order=True)
    assert prob.dead == 1 and torch.equal(prob.W[:, 3], torch.zeros(W.shape[0]))
    assert torch.equal(W[:, :3], prob.W[:, :3])  # the caller's W is not changed, the rest copied
    diag = H.diagonal().clone()
    diag[3] = 1.0
    assert torch.equal(prob.perm, torch.argsort(diag, descending=True))
    assert torch.equal(prepare(W, H, percdamp=0.01).perm, torch.arange(16))


def test_a_mask_that_keeps_everything_is_gptq():
    W, H = _problem(n_in=64)
    scheme = IntScheme(bits=4, granularity=PerGroup(16))
    keep = torch.ones_like(W, dtype=torch.bool)
    qw, stats = gptq_quantize(W, H, scheme, blocksize=16, act_order=True)
    res = solve_with_mask(W, H, keep, scheme=scheme, blocksize=16, act_order=True)
    assert torch.equal(res.qweight.codes, qw.codes) and torch.equal(res.qweight.scale, qw.scale)
    assert abs(res.stats["loss"] - stats["loss"]) <= 1e-6 * max(1.0, stats["loss"])


def test_a_fixed_mask_stays_and_is_compensated():
    W, H = _problem()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    res = solve_with_mask(W, H, keep, blocksize=16)
    assert torch.equal(res.keep, keep) and torch.equal(res.weight[~keep], torch.zeros(int((~keep).sum())))
    naive = W * keep
    err = lambda Q: torch.trace((W - Q) @ H @ (W - Q).t())  # noqa: E731 -- layer output error
    assert err(res.weight) < err(naive)
