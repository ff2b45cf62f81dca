import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.prune import NM, Unstructured, keep_mask, nm_keep, parse_pattern, topk_keep_global
from slimlm.prune.masks import is_nm, topk_keep_per_layer, topk_keep_per_row
from slimlm.prune.patterns import check_fits, check_sparsity, n_pruned, resolve_sparsity


def test_parse_pattern_shorthand_once():
    assert parse_pattern("2:4") == NM(2, 4) and parse_pattern(" 4 : 8 ") == NM(4, 8)
    assert parse_pattern("unstructured") == Unstructured() and parse_pattern(NM(1, 4)) == NM(1, 4)
    assert str(NM(2, 4)) == "2:4" and NM(1, 4).sparsity == 0.75


@pytest.mark.parametrize("bad, words", [
    ("4:4", "N (kept) must be < M"), ("5:4", "N (kept) must be < M"), ("0:4", "positive ints"),
    ("two:four", "valid: \"unstructured\" or \"N:M\""), (124, "quote N:M patterns in YAML"),
])  # fmt: skip
def test_bad_patterns_get_one_line(bad, words):
    with pytest.raises(SlimlmError) as e:
        parse_pattern(bad)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, "half", True])
def test_sparsity_outside_unit_interval_refused(s):
    with pytest.raises(SlimlmError, match=r"in \[0, 1\)"):
        check_sparsity(s)


def test_sparsity_resolution():
    assert resolve_sparsity(None, Unstructured()) == 0.5 and resolve_sparsity(0.7, Unstructured()) == 0.7
    assert resolve_sparsity(None, NM(1, 4)) == 0.75 and resolve_sparsity(0.5, NM(2, 4)) == 0.5
    with pytest.raises(SlimlmError, match="contradicts pattern 2:4"):
        resolve_sparsity(0.6, NM(2, 4))


def test_m_not_dividing_in_features_lists_valid_m():
    with pytest.raises(SlimlmError, match=r"M=8 of pattern 2:8 does not divide in_features 36; "
                                          r"valid M: 2, 3, 4, 6, 9, 12, 18, 36"):
        check_fits(NM(2, 8), 36, name="x")
    check_fits(Unstructured(), 36)


def _scores(shape=(16, 40), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_topk_counts_are_exact(s):
    S = _scores()
    row = topk_keep_per_row(S, s)
    assert ((~row).sum(1) == n_pruned(40, s)).all()
    layer = topk_keep_per_layer(S, s)
    assert int((~layer).sum()) == n_pruned(S.numel(), s)
    # the pruned ones are the lowest: every kept score >= every pruned score (per row / per layer)
    if 0 < s:
        assert S[layer].min() >= S[~layer].max()
        assert (torch.where(row, S, float("inf")).amin(1) >= torch.where(row, -float("inf"), S).amax(1)).all()


def test_ties_still_give_exact_counts():
    S = torch.zeros(8, 16)  # all tied
    assert int((~topk_keep_per_layer(S, 0.5)).sum()) == 64
    assert ((~topk_keep_per_row(S, 0.25)).sum(1) == 4).all()
    keeps = topk_keep_global([S, torch.zeros(4, 4)], 0.5)
    assert sum(int((~k).sum()) for k in keeps) == n_pruned(128 + 16, 0.5)


def test_global_topk_uses_one_threshold_across_matrices():
    big, small = _scores((8, 8)) * 10, _scores((8, 8), 1) * 0.01
    keep_big, keep_small = topk_keep_global([big, small], 0.5)
    assert int((~keep_big).sum()) + int((~keep_small).sum()) == 64
    assert int((~keep_small).sum()) > 32  # the small-scale matrix loses more than half


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    S = _scores()
    keep = nm_keep(S, n, m)
    assert is_nm(keep, n, m) and not is_nm(keep, n + 1, m)
    groups, kept = S.reshape(16, -1, m), keep.reshape(16, -1, m)
    lo_kept = torch.where(kept, groups, float("inf")).amin(-1)
    hi_pruned = torch.where(kept, -float("inf"), groups).amax(-1)
    assert (lo_kept >= hi_pruned).all()
    assert torch.equal(keep_mask(S, 0.0, NM(n, m)), keep)  # N:M ignores sparsity and scope


def test_keep_mask_refuses_unknown_scope():
    with pytest.raises(SlimlmError, match="scope must be one of row, layer"):
        keep_mask(_scores(), 0.5, Unstructured(), scope="block")
