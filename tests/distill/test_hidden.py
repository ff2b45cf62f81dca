"""hidden_loss, HiddenProjection, layer_map and check_layer_map on tiny models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.distill.hidden import HiddenProjection, check_layer_map, hidden_loss, layer_map
from slimlm.distill.teacher import frozen_copy
from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_config, tiny_model
from slimlm.prune import PruneDepth, apply_prune_depth
from slimlm.prune.surgery import remove_layers

_g = torch.Generator().manual_seed(0)
STATES = tuple(torch.randn(2, 5, 8, generator=_g) for _ in range(4))  # embeddings + 3 layers, (B, T, H)


def _deep_llama(layers=6, *, random_norms=True):
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        if random_norms:  # a trained model's norms differ per block; a fresh one's are all ones
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.data.uniform_(0.5, 1.5)
    return model


def test_hidden_loss_is_zero_on_identical_states_and_positive_otherwise():
    pairs = [(0, 0), (2, 2)]
    for kind in ("mse", "cosine"):
        assert hidden_loss(STATES, STATES, pairs, kind=kind).abs() < 1e-6
        assert hidden_loss(STATES, STATES, [(0, 1)], kind=kind) > 0.1


def test_mse_is_normalised_by_the_teacher_mean_square_and_averaged_over_pairs():
    t = STATES
    s = tuple(x * 0.5 for x in t)  # error = 0.5 t: normalised MSE 0.25 exactly, at any scale of t
    assert hidden_loss(s, t, [(1, 1)]).item() == pytest.approx(0.25, rel=1e-6)
    assert hidden_loss(tuple(x * 100 for x in s), tuple(x * 100 for x in t), [(1, 1)]).item() == pytest.approx(0.25)
    a, b = hidden_loss(s, t, [(0, 1)]), hidden_loss(s, t, [(2, 2)])
    torch.testing.assert_close(hidden_loss(s, t, [(0, 1), (2, 2)]), (a + b) / 2)
    # student layer i reads state i+1: pair (0, 1) is state 1 against state 2
    expected = (s[1] - t[2]).pow(2).mean() / t[2].pow(2).mean()
    torch.testing.assert_close(a, expected)


def test_cosine_range_and_reference():
    assert hidden_loss(tuple(-x for x in STATES), STATES, [(1, 1)], kind="cosine").item() == pytest.approx(2.0)
    got = hidden_loss(STATES, STATES, [(0, 2)], kind="cosine").item()
    s, t = STATES[1].reshape(-1, 8), STATES[3].reshape(-1, 8)
    ref = 1 - sum(float(a @ b / (a.norm() * b.norm())) for a, b in zip(s, t)) / len(s)
    assert got == pytest.approx(ref, rel=1e-5) and 0 <= got <= 2


def test_projection_is_used_when_widths_differ():
    wide = tuple(torch.randn(2, 5, 12, generator=_g) for _ in range(4))
    with pytest.raises(SlimlmError, match=r"pass projection=HiddenProjection\(d_student, d_teacher\)"):
        hidden_loss(STATES, wide, [(0, 0)])
    proj = HiddenProjection(8, 12)
    assert torch.equal(proj.weight, torch.eye(12, 8)) and proj.bias is None
    # identity on the shared dims: the teacher's first 8 channels equal to the student and the rest zero -> 0
    padded = tuple(torch.cat([x, torch.zeros(2, 5, 4)], -1) for x in STATES)
    assert hidden_loss(STATES, padded, [(1, 1)], projection=proj).abs() < 1e-6
    loss = hidden_loss(STATES, wide, [(1, 1)], projection=proj)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_hidden_loss_on_model_states_from_a_frozen_copy_is_zero():
    model = tiny_model("llama")
    ids = torch.randint(3, 512, (2, 6), generator=_g)
    s = model(input_ids=ids, output_hidden_states=True).hidden_states
    t = frozen_copy(model)(input_ids=ids, output_hidden_states=True).hidden_states
    assert hidden_loss(s, t, layer_map(model, model)).abs() < 1e-6


def test_layer_map_recovers_the_blocks_kept_by_depth_pruning():
    teacher = _deep_llama()
    student = remove_layers(frozen_copy(teacher), [1, 4])
    assert layer_map(student, teacher) == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert layer_map(teacher, teacher) == [(i, i) for i in range(6)]


@pytest.mark.parametrize("random_norms", [True, False], ids=["trained-norms", "all-ones-norms"])
def test_layer_map_after_prune_depth(random_norms):
    teacher = _deep_llama(random_norms=random_norms)
    student = frozen_copy(teacher)
    before = [id(b) for b in student.model.layers]
    calib = torch.randint(3, 512, (4, 16), generator=_g)
    apply_prune_depth(student, PruneDepth(layers=3), calib)
    kept = [before.index(id(b)) for b in student.model.layers]  # the teacher indices of the surviving blocks
    assert len(kept) == 3 and kept != [1, 3, 5]  # not the uniform map, so the match is what finds it
    assert layer_map(student, teacher) == list(enumerate(kept))


def test_layer_map_falls_back_to_uniform_after_a_weight_change():
    teacher = _deep_llama()
    student = remove_layers(frozen_copy(teacher), [0, 1, 4])  # kept 2, 3, 5
    with torch.no_grad():
        student.model.layers[1].input_layernorm.weight.add_(1e-3)  # trained since
    # uniform: i -> floor((i + 1) * 6 / 3 + 1/2) - 1 = 1, 3, 5
    assert layer_map(student, teacher) == [(0, 1), (1, 3), (2, 5)]
    fresh = _deep_llama(random_norms=False)  # all-ones norms: a linear change is caught by the full compare
    student = remove_layers(frozen_copy(fresh), [2, 3])
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    assert layer_map(student, fresh) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # 1.5, 3, 4.5, 6 rounded half up


@pytest.mark.parametrize("order", [[4, 1], [2, 2]], ids=["reordered", "repeated"])
def test_layer_map_needs_distinct_teacher_blocks_in_increasing_order(order):
    teacher = _deep_llama()
    student = frozen_copy(teacher)
    student.model.layers = torch.nn.ModuleList([student.model.layers[j] for j in order])
    student.config.num_hidden_layers = 2
    assert layer_map(student, teacher) == [(0, 2), (1, 5)]  # not depth pruning: the uniform map


def test_layer_map_refuses_a_deeper_student_and_bad_maps():
    with pytest.raises(SlimlmError, match="more than the teacher's 2"):
        layer_map(_deep_llama(3), tiny_model("llama"))
    with pytest.raises(SlimlmError, match=r"layer_map pair \(5, 40\): teacher has 30 layers \(0-29\)"):
        check_layer_map([(0, 0), (5, 40)], 20, 30)
    with pytest.raises(SlimlmError, match=r"layer_map pair \(-1, 3\): student has 20 layers \(0-19\)"):
        check_layer_map([(-1, 3)], 20, 30)
    with pytest.raises(SlimlmError, match="layer_map is empty"):
        check_layer_map([], 20, 30)
    with pytest.raises(SlimlmError, match="must be two ints"):
        check_layer_map([(1, 2.0)], 20, 30)
    with pytest.raises(SlimlmError, match=r"student has 3 layers \(0-2\)"):
        hidden_loss(STATES, STATES, [(3, 0)])
    with pytest.raises(SlimlmError, match="valid: mse, cosine"):
        hidden_loss(STATES, STATES, [(0, 0)], kind="l1")
