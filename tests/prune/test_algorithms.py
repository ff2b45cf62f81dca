import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import IntScheme, PerChannel, PerGroup, codec
from slimlm.prune import NM, Unstructured, magnitude_mask, sparsegpt_prune, wanda_mask
from slimlm.prune.masks import is_nm
from slimlm.prune.patterns import n_pruned


def _layer(n_in=96, n_out=32, rows=1024, seed=0):
    """Correlated inputs whose channel scales spread over an order of magnitude, with a few loud ones
    (as in LLM activations), a weight, and H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / n_in**0.5)
    X = (X + 0.3 * torch.randn(rows, n_in, generator=g)) * torch.exp(0.7 * torch.randn(n_in, generator=g))
    X[:, :6] *= 4
    W = torch.randn(n_out, n_in, generator=g)
    return W, X, 2 * X.t() @ X / rows


def _out_err(W, X, W2):
    return ((W - W2) @ X.t()).pow(2).sum().item()


PATTERNS = [Unstructured(), NM(2, 4), NM(4, 8)]


def _check_pattern(keep, W2, pattern, sparsity):
    assert bool((W2[~keep] == 0).all())  # pruned entries are exactly zero
    if isinstance(pattern, NM):
        assert is_nm(keep, pattern.n, pattern.m)
    else:
        assert int((~keep).sum()) == n_pruned(keep.numel(), sparsity)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_wanda_and_sparsegpt_beat_magnitude_on_layer_output(pattern):
    W, X, H = _layer()
    s = 0.5
    mag = W * magnitude_mask(W, s, pattern)
    wanda = W * wanda_mask(W, X.pow(2).sum(0), s, pattern)
    res = sparsegpt_prune(W, H, s, pattern, blocksize=32)
    _check_pattern(res.keep, res.weight, pattern, s)
    e_mag, e_wanda, e_sgpt = _out_err(W, X, mag), _out_err(W, X, wanda), _out_err(W, X, res.weight)
    assert e_wanda < 0.9 * e_mag and e_sgpt < 0.9 * e_wanda, (e_mag, e_wanda, e_sgpt)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_sparsegpt_exact_sparsity_whatever_the_blocksize(s):
    W, _, H = _layer(n_in=80)
    for blocksize in (16, 24, 80, 128):  # blocks of unequal size, one block, a block wider than the layer
        res = sparsegpt_prune(W, H, s, Unstructured(), blocksize=blocksize)
        assert int((~res.keep).sum()) == n_pruned(W.numel(), s) and bool((res.weight[~res.keep] == 0).all())


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_sparsegpt_on_a_scaled_identity_hessian_is_magnitude(pattern):
    W, _, _ = _layer()
    H = 3.0 * torch.eye(W.shape[1])  # no correlations: no updates, saliency w^2 * const
    res = sparsegpt_prune(W, H, 0.5, pattern, blocksize=W.shape[1])  # one block: the mask is per layer
    keep = magnitude_mask(W, 0.5, pattern, scope="layer")
    assert torch.equal(res.keep, keep) and torch.equal(res.weight, W * keep)


def test_sparsegpt_on_a_diagonal_hessian_is_wanda_for_nm():
    W, _, _ = _layer()
    d = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(1)) + 0.1
    res = sparsegpt_prune(W, torch.diag(d), 0.5, NM(2, 4), percdamp=0.0, blocksize=40)  # N:M groups straddle blocks
    assert torch.equal(res.keep, wanda_mask(W, d, 0.5, NM(2, 4))) and torch.equal(res.weight, W * res.keep)


def test_sparsegpt_nm_groups_straddling_lazy_blocks_read_live_weights():
    W, X, H = _layer()
    aligned = sparsegpt_prune(W, H, 0.5, NM(2, 4), blocksize=32)
    straddling = sparsegpt_prune(W, H, 0.5, NM(2, 4), blocksize=30)
    assert is_nm(straddling.keep, 2, 4)
    e_a, e_s = _out_err(W, X, aligned.weight), _out_err(W, X, straddling.weight)
    assert abs(e_a - e_s) < 0.05 * e_a  # same algorithm, only where the lazy updates land differs


@pytest.mark.parametrize("scheme", [IntScheme(4, granularity=PerGroup(32)), IntScheme(3, True, PerChannel())],
                         ids=["int4-g32", "int3-channel-sym"])
@pytest.mark.parametrize("pattern", PATTERNS[:2], ids=str)
def test_joint_mode_rounds_survivors_zeroes_the_rest_and_beats_prune_then_round(scheme, pattern):
    W, X, H = _layer()
    joint = sparsegpt_prune(W, H, 0.5, pattern, scheme=scheme, blocksize=32)
    _check_pattern(joint.keep, joint.weight, pattern, 0.5)
    assert torch.equal(codec.dequantize(joint.qweight), joint.weight)  # the codes are the weight, zeros included
    back = codec.unpack(codec.pack(joint.qweight), scheme, joint.qweight.shape)
    assert torch.equal(codec.dequantize(back), joint.weight)
    pruned = sparsegpt_prune(W, H, 0.5, pattern, blocksize=32)
    rounded = codec.fake_quantize(pruned.weight, scheme)  # prune, then round: zeros stay zeros (integer zero point)
    assert bool((rounded[~pruned.keep] == 0).all())
    assert _out_err(W, X, joint.weight) < _out_err(W, X, rounded)


def test_fixed_mask_keeps_it_and_act_order_is_allowed_only_then():
    W, X, H = _layer()
    keep = magnitude_mask(W, 0.5, NM(2, 4))
    scheme = IntScheme(4, granularity=PerGroup(32))
    for act_order in (False, True):
        res = sparsegpt_prune(W * keep, H, 0.0, Unstructured(), scheme=scheme, keep=keep, act_order=act_order)
        assert torch.equal(res.keep, keep) and bool((res.weight[~keep] == 0).all())
        # GPTQ-style rounding with the mask fixed beats rounding the pruned weight to nearest
        assert _out_err(W * keep, X, res.weight) < _out_err(W * keep, X, codec.fake_quantize(W * keep, scheme))
    with pytest.raises(SlimlmError, match="act_order needs a fixed mask"):
        sparsegpt_prune(W, H, 0.5, Unstructured(), act_order=True)


def test_dead_inputs_are_pruned_first():
    W, X, H = _layer()
    H[:, 5] = 0
    H[5, :] = 0
    res = sparsegpt_prune(W, H, 0.5, Unstructured())
    assert res.stats["dead"] == 1 and not res.keep[:, 5].any()


def test_bad_inputs_get_one_line():
    W, X, H = _layer()
    with pytest.raises(SlimlmError, match="W must be"):
        sparsegpt_prune(W, H[:5], 0.5, Unstructured())
    with pytest.raises(SlimlmError, match="int scheme"):
        sparsegpt_prune(W, H, 0.5, Unstructured(), scheme=codec.NF4Scheme())
    with pytest.raises(SlimlmError, match="valid M"):
        sparsegpt_prune(W, H, 0.5, NM(2, 5))
    with pytest.raises(SlimlmError, match=r"x_sq_norm must be \(in,\)"):
        wanda_mask(W, X.pow(2).sum(1), 0.5, Unstructured())
