"""forward_kl (temperature, top-k teacher), reverse_kl and top_k_logits against per-position references."""

import math

import numpy as np
import pytest
import torch

from slimlm.distill.logit import forward_kl
from slimlm.distill.reverse import reverse_kl
from slimlm.distill.topk import TopKLogits, top_k_logits
from slimlm.errors import SlimlmError

_g = torch.Generator().manual_seed(0)
S, T = torch.randn(2, 3, 7, generator=_g) * 2, torch.randn(2, 3, 7, generator=_g) * 2  # (B, T, V)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _reference(student, teacher, temp, *, reverse=False) -> float:
    """Per-position loop in float64 numpy: T^2 * mean_pos sum_v p (log p - log q)."""
    total, n = 0.0, 0
    for s_row, t_row in zip(student.double().reshape(-1, 7).numpy(), teacher.double().reshape(-1, 7).numpy()):
        p_s, p_t = _softmax(s_row / temp), _softmax(t_row / temp)
        a, b = (p_s, p_t) if reverse else (p_t, p_s)
        total += float((a * (np.log(a) - np.log(b))).sum())
        n += 1
    return temp**2 * total / n


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_forward_kl_matches_a_per_position_reference_with_the_t_squared_factor(temp):
    got = forward_kl(S, T, temperature=temp)
    assert got.item() == pytest.approx(_reference(S, T, temp), rel=1e-5)
    if temp != 1:  # the T^2 factor is there: without it the value would be 4x smaller
        assert got.item() != pytest.approx(_reference(S, T, temp) / temp**2, rel=1e-2)


def test_forward_kl_at_t1_is_bit_identical_to_the_old_formula():
    # QAT and gradual pruning pin losses through it; large enough that a reordered sum changes low bits
    s, t = torch.randn(4, 16, 512, generator=_g) * 3, torch.randn(4, 16, 512, generator=_g) * 3
    old = torch.nn.functional.kl_div(s.reshape(-1, 512).log_softmax(-1), t.reshape(-1, 512).log_softmax(-1),
                                     log_target=True, reduction="batchmean")  # fmt: skip
    assert torch.equal(forward_kl(s, t), old) and torch.equal(forward_kl(s, t, temperature=1.0), old)


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl])
def test_zero_for_identical_logits(loss):
    assert loss(S, S).abs() < 1e-6 and loss(S, S, temperature=3.0).abs() < 1e-5


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_reverse_kl_matches_a_per_position_reference(temp):
    assert reverse_kl(S, T, temperature=temp).item() == pytest.approx(_reference(S, T, temp, reverse=True), rel=1e-5)


def test_reverse_differs_from_forward_on_an_asymmetric_example():
    # teacher bimodal, student on one mode: forward KL (mass-covering) punishes the missed mode hard,
    # reverse KL (mode-seeking) little
    teacher = torch.tensor([[[5.0, 5.0, -5.0, -5.0]]])
    student = torch.tensor([[[6.0, -2.0, -5.0, -5.0]]])
    fwd, rev = forward_kl(student, teacher).item(), reverse_kl(student, teacher).item()
    assert fwd > rev + 0.5 and rev > 0


def test_top_k_with_k_equal_v_is_the_full_kl():
    for temp in (1.0, 2.0):
        torch.testing.assert_close(forward_kl(S, top_k_logits(T, 7), temperature=temp),
                                   forward_kl(S, T, temperature=temp))  # fmt: skip


def test_top_k_small_k_matches_a_hand_reference():
    student = torch.tensor([[[1.0, 0.0, 2.0, -1.0]]])  # (1, 1, 4)
    teacher = torch.tensor([[[0.5, 3.0, -2.0, 1.0]]])
    topk = top_k_logits(teacher, 2)
    assert topk.indices.tolist() == [[[1, 3]]] and topk.values.tolist() == [[[3.0, 1.0]]]
    temp = 2.0
    # teacher renormalised over ids {1, 3} at T=2: logits 1.5, 0.5
    p1 = math.exp(1.5) / (math.exp(1.5) + math.exp(0.5))
    p3 = 1 - p1
    # student full softmax at T=2 (logits 0.5, 0, 1, -0.5), read at ids 1 and 3
    z = math.log(sum(math.exp(x) for x in (0.5, 0.0, 1.0, -0.5)))
    ls1, ls3 = 0.0 - z, -0.5 - z
    expected = temp**2 * (p1 * (math.log(p1) - ls1) + p3 * (math.log(p3) - ls3))
    assert forward_kl(student, topk, temperature=temp).item() == pytest.approx(expected, rel=1e-6)


def test_top_k_refusals():
    with pytest.raises(SlimlmError, match=r"top_k must be an int in 1\.\.7"):
        top_k_logits(T, 8)
    with pytest.raises(SlimlmError, match=r"top_k must be an int in 1\.\.7"):
        top_k_logits(T, 0)
    with pytest.raises(SlimlmError, match="must be long"):
        TopKLogits(T[..., :2], torch.zeros(2, 3, 2, dtype=torch.int32))
    with pytest.raises(SlimlmError, match="use loss kl \\(forward\\) with top_k"):
        reverse_kl(S, top_k_logits(T, 3))
    with pytest.raises(SlimlmError, match="temperature must be a number > 0"):
        forward_kl(S, T, temperature=0.0)
    with pytest.raises(SlimlmError, match="compute both on the same"):
        forward_kl(S[:1], top_k_logits(T, 3))


def test_top_k_kl_gradient_reaches_only_student_ids_through_the_full_softmax():
    student = S.clone().requires_grad_(True)
    forward_kl(student, top_k_logits(T, 2)).backward()
    assert student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()
    # the full-softmax normaliser couples every logit: ids outside the top 2 get gradient too (positive:
    # the loss lowers their mass)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, top_k_logits(T, 2).indices, False)
    assert (student.grad[outside] > 0).all()
