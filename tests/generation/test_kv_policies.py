import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.generation.kv.policies import (H2O, Sinks, Window, h2o_keep, keep_slots, parse_policy, sinks_keep,
                                          window_keep)
from slimlm.generation.kv.quant import KIVI


def test_window_keeps_the_most_recent_budget_slots():
    assert window_keep(10, 4).tolist() == [6, 7, 8, 9]
    assert window_keep(3, 4).tolist() == [0, 1, 2]


@pytest.mark.parametrize("length", [1, 7, 8, 9, 30])
def test_sinks_keep_the_first_tokens_and_a_recent_window(length):
    kept = sinks_keep(length, 8, 3).tolist()
    if length <= 8:
        assert kept == list(range(length))
    else:
        assert kept == [0, 1, 2, *range(length - 5, length)]
    assert keep_slots(Sinks(8, 3), length).tolist() == kept
    assert keep_slots(Sinks(8, 0), length).tolist() == keep_slots(Window(8), length).tolist()


def test_h2o_keeps_recent_plus_the_highest_accumulated_scores_per_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 40, generator=g)  # (B, Hkv, L)
    kept = h2o_keep(scores, 16, 6)  # 10 heavy hitters + 6 recent
    assert kept.shape == (2, 3, 16)
    for b in range(2):
        for h in range(3):
            row = kept[b, h].tolist()
            assert row == sorted(row) and len(set(row)) == 16
            assert row[-6:] == list(range(34, 40))
            heavy, old = set(row[:-6]), scores[b, h, :34]
            assert heavy == set(old.topk(10).indices.tolist())
    # rows choose independently: two heads with opposite scores keep disjoint heavy hitters
    s = torch.stack([torch.arange(20.0), -torch.arange(20.0)])
    k = h2o_keep(s, 6, 2)
    assert k[0].tolist() == [14, 15, 16, 17, 18, 19] and k[1].tolist() == [0, 1, 2, 3, 18, 19]


def test_h2o_ties_keep_the_older_slot_and_short_caches_keep_everything():
    assert h2o_keep(torch.zeros(10), 5, 2).tolist() == [0, 1, 2, 8, 9]
    assert h2o_keep(torch.rand(1, 4), 5, 2).tolist() == [[0, 1, 2, 3]]
    assert keep_slots(H2O(8), 12, torch.rand(12)).shape == (8,)


@pytest.mark.parametrize("make, needle", [
    (lambda: Sinks(4, 4), "at least sinks + 1 = 5"),
    (lambda: Sinks(8, -1), "sinks must be an int >= 0"),
    (lambda: Window(0), "positive int"),
    (lambda: H2O(8, 8), "[1, budget - 1 = 7]"),
    (lambda: H2O(1), "h2o budget must be >= 2"),
    (lambda: parse_policy("lru", 8), "choose one of: full, window, sinks, h2o"),
    (lambda: parse_policy("sinks", None), "needs a budget"),
    (lambda: keep_slots(H2O(4), 6), "H2O needs accumulated scores"),
    (lambda: KIVI(bits=3), "one of 2, 4, 8"),
    (lambda: KIVI(group=32, residual=48), "multiple of group 32"),
    (lambda: KIVI(group=32, residual=16), "KV residual must be an int >= group"),
    (lambda: KIVI(value_group=24).check_head_dim(64), "valid: 1, 2, 4, 8, 16, 32, 64"),
])
def test_bad_settings_are_refused_in_one_line(make, needle):
    with pytest.raises(SlimlmError) as e:
        make()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_parse_policy():
    assert parse_policy("full", None) is None
    assert parse_policy("sinks", 64, sinks=2) == Sinks(64, 2)
    assert parse_policy("h2o", 64, recent=8) == H2O(64, 8)
    assert parse_policy("window", 64) == Window(64)
