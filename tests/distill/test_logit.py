import torch

from slimlm.distill import forward_kl, frozen_copy, teacher_objective
from slimlm.models.tiny import tiny_model
from slimlm.train import next_token_loss

_g = torch.Generator().manual_seed(0)
S, T = torch.randn(2, 5, 11, generator=_g), torch.randn(2, 5, 11, generator=_g)  # (B, T, V)


def test_forward_kl_is_the_mean_per_token_kl_teacher_to_student():
    p_t, log_s = T.softmax(-1), S.log_softmax(-1)
    expected = (p_t * (p_t.log() - log_s)).sum(-1).mean()
    torch.testing.assert_close(forward_kl(S, T), expected)
    assert forward_kl(T, T).abs() < 1e-6 and forward_kl(S, T) > 0
    assert not torch.allclose(forward_kl(S, T), forward_kl(T, S))  # not symmetric: the teacher weights the sum


def test_next_token_loss_predicts_the_following_id():
    ids = torch.randint(11, (2, 5), generator=_g)
    expected = -S[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(next_token_loss(S, ids), expected)


def test_teacher_objective_is_zero_against_a_frozen_copy_and_grads_reach_only_the_student():
    model = tiny_model("llama")
    teacher = frozen_copy(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(3, 512, (2, 8), generator=_g)
    loss = teacher_objective(teacher)(model, ids)
    assert loss.abs() < 1e-5
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
