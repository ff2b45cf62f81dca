"""Distill as a method: teacher plumbing, what trains and what stays fixed, refusals."""

import pytest
import torch

from slimlm.api import apply, apply_all
from slimlm.distill import Distill, frozen_copy
from slimlm.distill.handler import trainable_parameters
from slimlm.errors import SlimlmError
from slimlm.lowrank import SVD
from slimlm.nn import LowRankLinear, QuantLinear, SparseLinear
from slimlm.prune.handlers import Magnitude
from slimlm.prune.structured_config import PruneDepth
from slimlm.quant.rtn import RTN
from slimlm.models.tiny import tiny_model

CALIB = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
FAST = dict(steps=12, seq_len=32, batch_size=2, lr=3e-3, warmup=0)


def kl_to(teacher, student) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher(IDS).logits, -1)
        q = torch.log_softmax(student(IDS).logits, -1)
    return float(torch.nn.functional.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean"))


def test_logit_kd_pulls_a_pruned_student_towards_its_teacher():
    teacher = tiny_model("llama")
    student = apply(tiny_model("llama", seed=1), Magnitude(sparsity=0.5))  # far from the teacher
    before = kl_to(teacher, student)
    apply(student, Distill(**FAST), CALIB, teacher=frozen_copy(teacher))
    assert kl_to(teacher, student) < 0.8 * before


def test_masks_stay_fixed_and_survivors_train():
    teacher = tiny_model("llama")
    student = apply(frozen_copy(teacher), Magnitude(sparsity=0.5))
    sparse = {n: m for n, m in student.named_modules() if isinstance(m, SparseLinear)}
    keep = {n: m.keep_mask().clone() for n, m in sparse.items()}
    weights = {n: m.dequantized_weight().clone() for n, m in sparse.items()}
    apply(student, Distill(**FAST), CALIB, teacher=teacher)
    after = {n: m for n, m in student.named_modules() if isinstance(m, SparseLinear)}
    assert after.keys() == sparse.keys()
    for n, m in after.items():
        assert torch.equal(m.keep_mask(), keep[n])
        W = m.dequantized_weight()
        assert torch.all(W[~keep[n]] == 0) and not torch.equal(W, weights[n])


def test_quantized_codes_stay_fixed_and_the_float_rest_trains():
    teacher = tiny_model("llama")
    student = apply(frozen_copy(teacher), RTN(scheme="int4-g32"))
    packed = {k: v.clone() for k, v in student.state_dict().items() if "mlp" in k or "self_attn" in k}
    norm = student.model.norm.weight.clone()
    params, masked, summary = trainable_parameters(student)
    assert not masked and all(p.is_floating_point() for p in params) and "packed modules" in summary
    apply(student, Distill(**FAST), CALIB, teacher=teacher)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in packed.items())
    assert any(isinstance(m, QuantLinear) for m in student.modules())
    assert not torch.equal(student.model.norm.weight, norm)


def test_a_recipe_distils_from_the_model_before_its_first_step_with_hidden_states():
    model = tiny_model("llama")
    reports = []
    steps = [PruneDepth(layers=1), Distill(**{**FAST, "lr": 1e-3}, hidden_weight=1.0)]
    apply_all(model, steps, CALIB, training=reports)
    assert model.config.num_hidden_layers == 1
    assert len(reports) == 1 and reports[0]["method"] == "distill" and len(reports[0]["losses"]) == FAST["steps"]
    losses = reports[0]["losses"]
    # a teacher copied after the pruning would start at loss 0 (the same model); the unpruned one does not
    assert losses[0] > 1e-3 and sum(losses[-3:]) / 3 < losses[0]


def test_plain_fine_tuning_needs_no_teacher_and_kd_refuses_without_one():
    model = tiny_model("llama")
    apply(model, Distill(**FAST, loss="ce"), CALIB)  # next-token CE on the text alone
    with pytest.raises(SlimlmError, match="distill needs a teacher"):
        apply(model, Distill(**FAST), CALIB)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be > 0"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(loss="mse"), "loss must be one of kl, reverse_kl, ce"),
    (dict(loss="reverse_kl", top_k=8), "top_k works with loss kl only"),
    (dict(layer_map=[[0]]), "layer_map must be a non-empty list"),
    (dict(data="teacher", prompt_len=64, seq_len=64), "prompt_len 64 leaves nothing"),
    (dict(ce_weight=1.5), "ce_weight must be in"),
    (dict(temperature=0), "temperature must be > 0"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(SlimlmError, match=match):
        Distill(**kwargs)


def test_bad_runs_are_refused_and_leave_the_student_as_it_was():
    teacher, student = tiny_model("llama"), tiny_model("llama", seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(SlimlmError, match="vocabulary .*differs"):
        apply(student, Distill(**FAST), CALIB, teacher=tiny_model("llama", vocab_size=256))
    with pytest.raises(SlimlmError, match="teacher has 2 layers"):
        apply(student, Distill(**FAST, hidden_weight=1.0, layer_map=[[0, 5]]), CALIB, teacher=teacher)
    with pytest.raises(SlimlmError, match="distill"):
        apply(student, Distill(**FAST), None, teacher=teacher)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    with pytest.raises(SlimlmError, match="rtn does not train"):
        apply(student, RTN(), teacher=teacher)


def test_masked_linear_trains_only_survivors_and_converts_exactly():
    from slimlm.nn.masked import MaskedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    keep = torch.rand(8, 16) > 0.5
    sparse = SparseLinear.from_linear(linear, keep)
    masked = MaskedLinear.from_sparse(sparse)
    x = torch.randn(4, 16)
    masked(x).pow(2).sum().backward()
    assert torch.all(masked.weight.grad[~keep] == 0) and masked.weight.grad[keep].abs().sum() > 0
    with torch.no_grad():
        masked.weight.add_(torch.randn_like(masked.weight))  # an optimizer step that also touches pruned slots
        assert torch.equal(masked.to_sparse_linear()(x), masked(x))
        assert torch.equal(masked.to_sparse_linear().keep_mask(), keep)


def test_low_rank_factors_train_and_keep_their_rank():
    teacher = tiny_model("llama")
    student = apply(tiny_model("llama", seed=1), SVD(params=0.3))  # far from the teacher
    lowrank = {n: (m.rank, m.A.clone(), m.B.clone()) for n, m in student.named_modules()
               if isinstance(m, LowRankLinear)}  # fmt: skip
    params, _, summary = trainable_parameters(student)
    ids = {id(p) for p in params}
    assert lowrank and all(id(m.A) in ids and id(m.B) in ids for m in student.modules() if isinstance(m, LowRankLinear))
    before = kl_to(teacher, student)
    apply(student, Distill(**FAST), CALIB, teacher=teacher)
    after = {n: m for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    assert after.keys() == lowrank.keys()
    for n, m in after.items():
        rank, A, B = lowrank[n]
        assert m.rank == rank and m.A.shape == A.shape and not torch.equal(m.A, A) and not torch.equal(m.B, B)
    assert kl_to(teacher, student) < 0.8 * before
