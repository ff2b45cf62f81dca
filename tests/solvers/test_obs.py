import torch

from slimlm.solvers import LazyBlock, dampen_and_invert, obs_solve


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
